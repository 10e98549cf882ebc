"""The latent-sharded dense step (sae/distributed/) is the single-process step, split over ranks.

Under torchrun (gloo, 2 and 3 processes, d_sae 10: slices of 5 + 5 and 4 + 4 + 2) the sharded step must give the
single-process step's losses, L0, active latents and, gathered, every parameter after four steps; move exactly
`step_bytes` per step; keep the replicated values (loss, b_dec) identical on every rank; refuse ranks started
with different configs; and fail, not hang, when a rank dies. In one process, `Mesh.single()` must be today's
step bit for bit.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from kernels.reference import Forward
from sae.config import OptimConfig
from sae.dense_step import DenseStep
from sae.distributed.layout import latent_slice
from sae.distributed.mesh import Mesh, check_same_config
from sae.distributed.sharded import clip_grad_norm_, gather_sae, shard_sae, sharded_forward, step_bytes
from sae.errors import ConfigError
from sae.trainer import make_step
from tests import sharded_worker as w
from tests.torchrun import torchrun

WORKER = Path(__file__).with_name("sharded_worker.py")
EPS32 = torch.finfo(torch.float32).eps
# Tolerances from fp32 precision. Sharding changes only the order of the fp32 sums (x_hat's over latents,
# the loss's over tokens and d_in, b_dec's gradient over ranks), each of at most N_TERMS = max(B, D, F) terms,
# whose result differs by at most about N_TERMS * eps relative to the summed magnitudes (Higham's recursive
# summation bound). One step's figures get that much; the parameters after STEPS Adam steps carry one such error
# per step (Adam divides the gradient by its own scale, so relative gradient errors become lr-sized updates at
# most that much off relative).
N_TERMS = max(w.B, w.D_IN, w.D_SAE)
STEP_TOL = N_TERMS * EPS32
PARAM_TOL = len(w.OBJECTIVES) * N_TERMS * EPS32
FIGURES = ("loss", "reconstruction", "mse", "explained_variance", "grad_norm")


@pytest.fixture(scope="module")
def single():
    return w.train_single()


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_step_equals_the_single_process_step(world, single, tmp_path):
    torchrun(world, WORKER, "train", str(tmp_path), timeout=120)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
    steps, params = single
    expected_bytes = step_bytes(w.B, w.D_IN)
    kinds = {f"all_reduce/{kind}": n for kind, n in expected_bytes._asdict().items()}
    for rank, result in enumerate(ranks):
        for i, (got, want) in enumerate(zip(result["steps"], steps, strict=True)):
            where = f"rank {rank} of {world}, step {i}"
            for name in FIGURES:
                torch.testing.assert_close(got[name], want[name], rtol=STEP_TOL, atol=STEP_TOL, msg=f"{name}, {where}")
            assert got["l0"] == want["l0"], where  # a sum of integer counts: exact
            assert got["communicated_bytes"] == expected_bytes.total, where
            assert got["sent"] == kinds, where
            # every figure is computed from reduced values: the same bits on every rank
            assert all(got[n] == ranks[0]["steps"][i][n] for n in FIGURES), where
        for name, want in params.items():
            torch.testing.assert_close(result["params"][name], want, rtol=PARAM_TOL, atol=PARAM_TOL, msg=name)
        assert torch.equal(result["b_dec"], ranks[0]["b_dec"]), f"b_dec drifted apart on rank {rank}"
        assert "sae.d_sae (rank 0: 10, rank 1: 12" in result["mismatch"]
        assert "Start every rank with the same command line" in result["mismatch"]
    # Local active latents shifted by each rank's slice start are, together, the whole SAE's active set.
    for i, want in enumerate(steps):
        union = [set().union(*(r["steps"][i]["active"][b] for r in ranks)) for b in range(w.B)]
        assert union == want["active"], f"step {i}"


@pytest.mark.parametrize("how", ["dies", "stalls"])
def test_a_lost_rank_makes_the_others_fail_within_the_timeout(how, tmp_path):
    run = torchrun(2, WORKER, how, str(tmp_path), timeout=60, check=False)
    assert run.returncode != 0, run.stdout + run.stderr
    seconds, message = (tmp_path / "rank0.txt").read_text().split("\n", 1)
    assert float(seconds) < w.TIMEOUT_S[how] + 5, message
    if how == "stalls":  # nothing closed the connection: it was the timeout that ended the wait
        assert float(seconds) >= 0.9 * w.TIMEOUT_S[how], message
    assert "all_reduce 'after' failed on rank 0 of 2" in message
    assert "another rank probably died or stalled" in message
    assert "CollectiveError" in run.stdout + run.stderr


def test_mesh_single_is_todays_dense_step_bit_for_bit():
    model, xs = w.make_problem()
    twin = copy.deepcopy(model)
    today = w.train(DenseStep(model, w.OPTIM), xs)
    mesh = Mesh.single()
    single = w.train(DenseStep(twin, w.OPTIM, mesh), xs, mesh=mesh)
    for got, want in zip(single, today, strict=True):
        assert all(got[n] == want[n] for n in (*FIGURES, "l0", "active")), (got, want)
        assert got["communicated_bytes"] == 0 and got["sent"] == {}
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_world_one_helpers_are_identities():
    model, xs = w.make_problem()
    mesh = Mesh.single()
    local = shard_sae(model, latent_slice(w.D_SAE, 1, 0))
    assert all(torch.equal(t, p) for t, p in zip(gather_sae(local, mesh, w.D_SAE).values(), [
        model.b_dec, model.W_enc, model.b_enc, model.threshold, model.W_dec,
    ], strict=True))  # fmt: skip
    out, want = sharded_forward(local, xs[0], mesh), model(xs[0])
    assert torch.equal(out.x_hat, want.x_hat) and torch.equal(out.l0, want.l0)
    (out.x_hat.sum() + out.l0.sum()).backward()
    (want.x_hat.sum() + want.l0.sum()).backward()
    twin_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    assert torch.equal(clip_grad_norm_(local, 0.1, mesh), twin_norm)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
    for (name, p), q in zip(local.named_parameters(), model.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), name


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("compute_dtype", [None, torch.float16])
def test_the_sharded_forward_runs_each_backend_as_its_fused_forward(backend, compute_dtype):
    """At world 1 the slice is the whole SAE: outputs and gradients must be the fused forward's (the Triton
    kernels in the interpreter off CUDA; float16 is the 16-bit operand path the interpreter can run)."""
    model, xs = w.make_problem()
    model.backend, model.compute_dtype = backend, compute_dtype
    twin = copy.deepcopy(model)
    out, want = sharded_forward(model, xs[0], Mesh.single()), twin(xs[0])
    for got, expected, name in zip(out, want, Forward._fields, strict=True):
        assert torch.equal(got, expected), name
    g = torch.randn(want.x_hat.shape, generator=torch.Generator().manual_seed(1))
    ((out.x_hat * g).sum() + out.l0.sum()).backward()
    ((want.x_hat * g).sum() + want.l0.sum()).backward()
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        if backend == "triton" and name == "b_dec":
            # the fused kernel sums b_dec's decoder and encoder parts in its own order: fp32 sums of 2 B terms
            tol = 2 * w.B * EPS32
            torch.testing.assert_close(p.grad, q.grad, rtol=tol, atol=tol * q.grad.abs().max().item())
        else:
            assert torch.equal(p.grad, q.grad), name


def test_shard_and_gather_refuse_a_wrong_size():
    model, _ = w.make_problem()
    with pytest.raises(ConfigError, match="the slice is of 12 latents but the SAE has 10"):
        shard_sae(model, latent_slice(12, 2, 0))
    with pytest.raises(ConfigError, match="rank 0 holds 10 latents but owns 5 of 10 over 2 ranks"):
        gather_sae(model, Mesh(0, 2, None, torch.device("cpu"), 1.0), 10)


def test_check_same_config_passes_in_one_process():
    check_same_config(Mesh.single(), {"sae": {"d_sae": 10}})


def test_mesh_from_env_outside_torchrun_says_how_to_launch(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError, match="not started by torchrun.*Mesh.single"):
        Mesh.from_env()


def test_make_step_refuses_the_sparse_step_over_several_ranks():
    model, _ = w.make_problem()
    two = Mesh(0, 2, None, torch.device("cpu"), 1.0)  # no collective runs: make_step refuses first
    with pytest.raises(ConfigError, match="sparse training step .* 2 ranks"):
        make_step(model, "triton", OptimConfig(adam_beta1=0.0), two)
    assert isinstance(make_step(model, "triton", OptimConfig(adam_beta1=0.9), two), DenseStep)


def test_step_bytes_formula():
    assert step_bytes(4096, 2304).total == 4 * (4096 * 2304 + 4096 + 2304 + 4)
