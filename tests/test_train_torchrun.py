"""`torchrun -m sae train` end to end on 2 gloo ranks: each rank harvests its share of the documents from the
tiny live model, trains its slice of the latents on the gathered global batch, saves sharded checkpoints with a
whole export, and resumes; rank 0 alone speaks."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from tests.test_train_live import live_flags
from tests.torchrun import torchrun


def test_torchrun_trains_resumes_and_exports_from_a_live_model(tiny_model, text_file, tmp_path):
    out = tmp_path / "two"
    flags = live_flags(tiny_model, text_file, target_l0=8, steps=6, log_every=1, checkpoint_every=3, out_dir=out)
    run = torchrun(2, "-m", "sae", "train", *flags, "--adam-beta1", "0.9", timeout=300)
    assert run.stdout.count("done: 6 steps") == 1, run.stdout  # rank 0 alone prints the summary
    assert "latents split over 2 ranks (32 on rank 0)" in run.stdout and "(rank 0 of 2)" in run.stdout
    folder = out / "checkpoints" / "step_000000006"
    info = json.loads((folder / "training_state.json").read_text())
    assert info["sharded"] == {"world": 2} and info["data_position"]["world"] == 2
    weights = load_file(str(folder / "sae_weights.safetensors"))  # the whole SAE, with safetensors alone
    assert weights["W_enc"].shape == (32, 64) and weights["W_dec"].shape == (64, 32)
    assert all(torch.isfinite(w).all() for w in weights.values())
    scale = json.loads((folder / "cfg.json").read_text())["saekit"]["folded_activation_scale"]
    unit = torch.full((64,), 1 / scale)  # unit decoder rows in training space, divided by the folded scale
    torch.testing.assert_close(weights["W_dec"].norm(dim=1), unit, rtol=1e-5, atol=0)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 7))
    assert all(r["world_size"] == 2 and r["communicated_bytes"] > 0 for r in records)

    resumed = torchrun(2, "-m", "sae", "train", "--resume", str(out), "--steps", "8", "--no-progress", timeout=300)
    assert "resuming at step 6" in resumed.stdout and resumed.stdout.count("done: 8 steps") == 1
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == list(range(1, 9))
