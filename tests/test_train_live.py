"""Training from a live (tiny, random) Gemma-2 through the real harvester and the real command line."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from harvest import BufferConfig, DataConfig, Harvester, ModelConfig
from sae.__main__ import main
from sae.config import ObjectiveConfig, OptimConfig, RunConfig, SAEConfig, TrainConfig
from sae.trainer import Trainer
from tests.test_training import fit_until_crash


def live_config(tiny_model: str, text_file: str, out_dir) -> TrainConfig:
    return TrainConfig(
        model=ModelConfig(model=tiny_model, layer=2, model_device="cpu"),
        data=DataConfig(dataset=text_file, context_size=16),
        buffer=BufferConfig(buffer_tokens=96, forward_batch_rows=4, passes=2),
        sae=SAEConfig(d_sae=64, init_l0=16.0),
        objective=ObjectiveConfig(target_l0=8.0, sparsity_warmup_steps=3),
        optim=OptimConfig(lr=3e-3, lr_warmup_steps=2, batch_size=32),
        run=RunConfig(steps=16, out_dir=str(out_dir), device="cpu", log_every=1, checkpoint_every=5, init_batches=2),
    )


def harvester(cfg: TrainConfig) -> Harvester:
    return Harvester(cfg.model, cfg.data, cfg.buffer, batch_size=cfg.optim.batch_size, progress=False)


def live_flags(tiny_model: str, dataset: str | None, **flags) -> list[str]:
    """The command-line flags of a tiny live run on `tiny_model` (the sizes of `live_config`), with `flags`
    added or replacing those (`target_l0=8` -> `--target-l0 8`; None drops a flag)."""
    values = {
        "model": tiny_model,
        "layer": 2,
        "model_device": "cpu",
        "dataset": dataset,
        "context_size": 16,
        "buffer_tokens": 96,
        "batch_size": 32,
        "d_sae": 64,
        "init_l0": 16,
        "device": "cpu",
        **flags,
    }
    args = [x for name, v in values.items() if v is not None for x in ("--" + name.replace("_", "-"), str(v))]
    return [*args, "--no-progress"]


def losses(out_dir) -> list[tuple[int, float, float]]:
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["l0"]) for r in rows]


def test_live_run_interrupted_and_resumed_reproduces_the_losses(tiny_model, text_file, tmp_path):
    cfg = live_config(tiny_model, text_file, tmp_path / "full")
    Trainer(cfg, harvester(cfg), progress=False).fit()

    cfg_b = live_config(tiny_model, text_file, tmp_path / "broken")
    broken = Trainer(cfg_b, harvester(cfg_b), progress=False)
    fit_until_crash(broken, 12, KeyboardInterrupt)  # after the checkpoint at step 10, in the second fill
    resumed = Trainer(cfg_b, harvester(cfg_b), progress=False, resume=tmp_path / "broken")
    resumed.fit()
    assert losses(tmp_path / "broken") == losses(tmp_path / "full")


def test_cli_trains_and_writes_a_loadable_checkpoint(tiny_model, text_file, tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["train", *live_flags(tiny_model, text_file, target_l0=8, steps=6, log_every=2, out_dir=out)]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "checkpoint" in text and "explained variance" in text and "dead latents" in text
    folder = out / "checkpoints" / "step_000000006"
    weights = load_file(str(folder / "sae_weights.safetensors"))
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["d_in"] == 32 and cfg["d_sae"] == 64 and weights["W_enc"].shape == (32, 64)
    assert cfg["metadata"]["hook_name"] == "blocks.2.hook_resid_post"
    assert cfg["metadata"]["exclude_special_tokens"] is True
    assert all(torch.isfinite(w).all() for w in weights.values())
    # Continuing for more steps picks up at step 6.
    assert main(["train", "--resume", str(out), "--steps", "8", "--no-progress"]) == 0
    assert (out / "checkpoints" / "step_000000008").is_dir()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--layer", "9"], "out of range"),
        (["--model", "no-such-org/no-such-model"], "cannot load model"),
        (["--dataset", "no-such-org/no-such-dataset"], "cannot load dataset"),
        (["--text-field", "body"], "available columns"),
        (["--d-sae", "8", "--target-l0", "8"], "target-l0"),
        (["--buffer-tokens", "16"], "buffer too small"),
    ],
)
def test_cli_bad_input_is_named_before_any_training(tiny_model, text_file, tmp_path, capsys, extra, message):
    base = ["train", *live_flags(tiny_model, text_file, d_sae=None, init_l0="none", out_dir=tmp_path / "r")]
    assert main(base + extra) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_cli_refuses_a_corrupt_checkpoint_on_resume(tmp_path, capsys):
    folder = tmp_path / "run" / "checkpoints" / "step_000000005"
    folder.mkdir(parents=True)
    (folder / "training_state.json").write_text("{truncated")
    assert main(["train", "--resume", str(tmp_path / "run")]) == 2
    assert "corrupt" in capsys.readouterr().err


def test_eval_compares_saes_on_held_out_tokens(tiny_model, text_file, tmp_path, capsys):
    common = live_flags(tiny_model, text_file, steps=4)
    for name, target in (("a", "8"), ("b", "4")):
        assert main(["train", *common, "--target-l0", target, "--out-dir", str(tmp_path / name)]) == 0
    out = tmp_path / "eval"
    args = [
        "eval",
        str(tmp_path / "a"),
        str(tmp_path / "b"),
        "--heldout-examples",
        "12",
        "--eval-tokens",
        "60",
        "--dark-matter-fit-tokens",
        "40",
        "--splice-rows",
        "4",
        "--eval-device",
        "cpu",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["model"] == tiny_model and report["layer"] == 2  # from the SAEs' metadata
    assert report["heldout"]["tokens"] == 60 and report["heldout"]["first_example"] == 40 - 12
    for path in (str(tmp_path / "a"), str(tmp_path / "b")):
        r = report["saes"][path]
        assert 0 <= r["reconstruction"]["fvu"] < 2 and r["reconstruction"]["tokens"] == 60
        assert r["tail_fvu_worst_1pct"] >= r["reconstruction"]["fvu"]
        assert r["sparsity"]["tokens"] == 60
        assert torch.isfinite(torch.tensor(r["downstream"]["delta_ce"]))
        assert r["dark_matter"]["fit_tokens"] == 40
    assert "| SAE |" in (out / "report.md").read_text() and "held-out tokens" in capsys.readouterr().out


def test_eval_can_include_special_tokens(tiny_model, text_file, tmp_path):
    common = live_flags(tiny_model, text_file, target_l0=8, steps=2)
    assert main(["train", *common, "--out-dir", str(tmp_path / "a")]) == 0
    spliced = {}
    for flag in ("--exclude-special-tokens", "--no-exclude-special-tokens"):
        out = tmp_path / flag
        assert (
            main(
                [
                    "eval",
                    str(tmp_path / "a"),
                    "--heldout-examples",
                    "12",
                    "--eval-tokens",
                    "40",
                    "--splice-rows",
                    "4",
                    "--eval-device",
                    "cpu",
                    "--out",
                    str(out),
                    "--no-progress",
                    flag,
                ]
            )
            == 0
        )
        report = json.loads((out / "report.json").read_text())
        spliced[flag] = report["saes"][str(tmp_path / "a")]["downstream"]["spliced_positions"]
    assert spliced["--no-exclude-special-tokens"] == spliced["--exclude-special-tokens"] + 4  # + one BOS per row


def test_train_and_eval_on_the_medical_qa_preset_from_a_local_mirror(tiny_model, tmp_path):
    from tests.test_text_sources import medical_mirror

    mirror = tmp_path / "mirror"
    medical_mirror(mirror)
    common = live_flags(tiny_model, None, steps=2)
    run = tmp_path / "run"
    assert main(["train", *common, "--dataset", "medical-qa", "--data-dir", str(mirror), "--out-dir", str(run)]) == 0
    meta = json.loads((run / "checkpoints" / "step_000000002" / "cfg.json").read_text())["metadata"]
    assert meta["dataset_path"] == "medical-qa" and meta["data_dir"] == str(mirror)
    out = tmp_path / "eval"  # the mirror comes from the SAE's metadata: offline, no --data-dir needed
    assert (
        main(
            [
                "eval",
                str(run),
                "--heldout-examples",
                "6",
                "--eval-tokens",
                "30",
                "--dark-matter-fit-tokens",
                "0",
                "--splice-rows",
                "2",
                "--eval-device",
                "cpu",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    assert json.loads((out / "report.json").read_text())["dataset"] == "medical-qa"


def test_eval_adds_k_sparse_probing_and_concept_removal_on_the_offline_tasks(tiny_model, text_file, tmp_path):
    """End to end on the tiny model: icd10-chapters and icd10-encounter texts through the LM and the SAE, into
    report.json and report.md (the tiny model's figures mean nothing; the path and the shapes are checked)."""
    assert main(["train", *live_flags(tiny_model, text_file, steps=4), "--out-dir", str(tmp_path / "a")]) == 0
    out = tmp_path / "eval"
    args = ["eval", str(tmp_path / "a"), "--heldout-examples", "12", "--eval-tokens", "40", "--splice-rows", "0",
            "--eval-device", "cpu", "--sparse-probing", "icd10-chapters", "--concept-removal", "icd10-encounter",
            "--probe-texts", "12", "--removal-latents", "2", "--out", str(out), "--no-progress"]  # fmt: skip
    assert main(args) == 0
    (result,) = json.loads((out / "report.json").read_text())["saes"].values()
    probing, removal = result["sparse_probing"], result["concept_removal"]
    assert probing["task"] == "icd10-chapters" and sorted(map(int, probing["k"])) == [1, 2, 5, 10, 20, 50]
    assert all(0.0 <= acc <= 1.0 for acc in [*probing["k"].values(), probing["dense"]])
    assert probing["train_texts"] == probing["test_texts"] == 5 * 12
    assert removal["spurious"] == "encounter" and len(removal["ablated"]) == 2
    assert all(0.0 <= removal[k]["worst_group"] <= 1.0 for k in ("before", "after", "after_fixed_probe"))
    md = (out / "report.md").read_text()
    assert "k-sparse probing on icd10-chapters" in md and "concept removal on icd10-encounter" in md
    assert "refitted probe" in md and "same probe" in md


def test_eval_refuses_a_labelled_task_without_labels_before_loading_the_model(tmp_path, capsys):
    texts = tmp_path / "texts.jsonl"
    texts.write_text(json.dumps({"text": "no label here"}) + "\n")
    assert main(["eval", str(tmp_path / "none"), "--sparse-probing", str(texts), "--no-progress"]) == 2
    assert "has no label" in capsys.readouterr().err
