"""Fine-tuning (full and LoRA): heads, adapters, merge, evaluate rows, CLI and bad input.

The data are small DNA tables written here; the base models are tiny and randomly
initialised (no pretraining needed to test the mechanics), saved as ordinary model folders.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from healthfm import cli, pipeline
from healthfm.errors import ConfigError, DataError, ModelError
from healthfm.evaluate.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from healthfm.evaluate.task_head import predict
from healthfm.fsutil import sha256_file
from healthfm.loader import BASE_REF, load_adapter, load_finetuned
from healthfm.modality import assign_splits, get_modality
from healthfm.model import FoundationModel, ModelConfig
from healthfm.model.pretrained import load, save_pretrained
from healthfm.stages.finetune import FinetuneConfig, finetune
from healthfm.train.data import StoreSource

SPLIT = {"split_salt": "healthfm", "split_fractions": [0.7, 0.1, 0.2]}


def xor_table(path, n: int = 800, length: int = 6, seed: int = 0):
    """Label = XOR of two token positions (1 and 4 are each A or C; the rest is noise).

    XOR is not linearly separable in anything additive over (token, position) features,
    and a frozen, randomly initialised backbone with mean pooling is close to additive: the
    frozen linear probe stays far from perfect, while fine-tuning can learn the interaction.
    """
    rng = np.random.default_rng(seed)
    seqs = rng.choice(list("ACGT"), size=(n, length))
    a, b = rng.random(n) < 0.5, rng.random(n) < 0.5
    seqs[:, 1] = np.where(a, "A", "C")
    seqs[:, 4] = np.where(b, "A", "C")
    rows = [f"{''.join(s)}\t{'yes' if v else 'no'}" for s, v in zip(seqs, a ^ b, strict=True)]
    path.write_text("sequence\tlabel\n" + "\n".join(rows) + "\n")
    return path


def make_base(path, data, seed: int = 0, d_model: int = 32):
    """A tiny random-initialised DNA model folder with the tokenizer fitted on ``data``."""
    modality = get_modality("dna")
    samples = modality.read(data, {})
    tok = modality.fit_tokenizer(samples, np.arange(len(samples)), {})
    torch.manual_seed(seed)
    config = ModelConfig(
        modality="dna",
        vocab_size=tok.vocab_size,
        d_model=d_model,
        n_layers=2,
        n_heads=2,
        d_ff=2 * d_model,
        max_len=tok.max_length,
    )
    save_pretrained(FoundationModel(config), path, tok, info=dict(SPLIT))
    return path


#: Floors for the fine-tuned head on the XOR table (how they were set: see the test below).
TUNED_AUROC_FLOOR, TUNED_OVER_PROBE = 0.80, 0.10
FULL = FinetuneConfig(head_init="random", epochs=40, patience=10, lr=3e-3, batch_size=32)
LORA = FinetuneConfig(lora=True, lora_rank=4, head_init="random", epochs=3, lr=3e-3, batch_size=64)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    data = xor_table(root / "xor.tsv")
    base = make_base(root / "base", data)
    full = finetune(base, data, root / "full", {}, FULL, n_boot=50, echo=False)
    base_hash = sha256_file(base / "model.safetensors")
    lora = finetune(base, data, root / "lora", {}, LORA, n_boot=50, echo=False)
    return {
        "root": root,
        "data": data,
        "base": base,
        "full": full,
        "lora": lora,
        "base_hash": base_hash,
    }


def _source(model, data):
    modality = get_modality("dna")
    samples = modality.read(data, {})
    import tempfile
    from pathlib import Path

    tmp = Path(tempfile.mkdtemp())
    return samples, StoreSource(
        modality.tokenize(model.tokenizer, samples, tmp / "s"), model.config.max_len
    )


def test_full_finetune_beats_frozen_probe_in_one_results_file(work, tmp_path):
    # One results.json: the frozen probe of the base, and the fine-tuned model's own head.
    rows = pipeline.evaluate(
        work["base"],
        work["data"],
        tmp_path / "ev",
        seeds=(0,),
        n_boot=50,
        include_baselines=False,
        echo=False,
        finetuned=[work["root"] / "full"],
    )
    auroc = {r.method: r.value for r in rows if r.metric == "auroc"}
    probe, tuned = auroc["model-mean+logreg"], auroc["model-finetune-full"]
    # Thresholds from the measured spread, with a margin. Over data and model seeds 0-4
    # (this machine, one thread): fine-tuned AUROC 0.970-1.000, frozen probe 0.642-0.751, gap
    # >= 0.257; the same seed 0 gave 0.891 on a fresh machine (issue 22), a shift of 0.08 from
    # CPU and library versions. 0.80 and a gap of 0.10 leave about 0.09 below the worst seen.
    assert tuned > TUNED_AUROC_FLOOR and tuned > probe + TUNED_OVER_PROBE, auroc
    saved = json.loads((tmp_path / "ev" / "results.json").read_text())
    ft = [r for r in saved if r["method"] == "model-finetune-full"]
    assert ft and all(r["ci_low"] <= r["value"] <= r["ci_high"] for r in ft)
    assert ft[0]["trainable_parameters"] == work["full"].trainable_parameters > 0
    assert work["full"].best_epoch >= 1 and work["full"].task == "binary"


def test_finetuned_folder_is_ordinary_and_reloads_to_identical_predictions(work, tmp_path):
    folder = work["root"] / "full"
    model = load(folder)  # strict: the task head is in config.json and model.safetensors
    spec = model.config.extra["task_head"]
    assert spec["task"] == "binary" and spec["classes"] == ["no", "yes"] and spec["n_outputs"] == 1
    assert "task_head.weight" in load_file(folder / "model.safetensors")
    _, source = _source(model, work["data"])
    result = work["full"]
    again = predict(model, source, result.test_indices)
    np.testing.assert_allclose(again, result.test_scores, rtol=0, atol=1e-6)
    info = json.loads((folder / "training_info.json").read_text())
    assert info["split_salt"] == "healthfm" and info["finetune"]["method"] == "full"
    # embed accepts it like any model folder
    out = pipeline.embed(folder, work["data"], tmp_path / "e.npy")
    assert np.load(out).shape == (800, 32)
    # ... and evaluate: the probe of its embedding next to its own head's predictions.
    rows = pipeline.evaluate(
        folder,
        work["data"],
        tmp_path / "ev",
        seeds=(0,),
        n_boot=10,
        include_baselines=False,
        echo=False,
    )
    assert {r.method for r in rows} == {
        "model-mean+logreg",
        "model-finetune-full",
        "model-untrained-mean+logreg",  # the control (no baselines here)
    }


def test_lora_leaves_base_weights_untouched(work):
    assert sha256_file(work["base"] / "model.safetensors") == work["base_hash"]
    folder = work["root"] / "lora"
    assert (folder / ADAPTER_CONFIG).is_file() and (folder / ADAPTER_WEIGHTS).is_file()
    ref = json.loads((folder / BASE_REF).read_text())
    assert ref["base_model"]["model_hash"] == work["base_hash"]
    base = load(work["base"])
    adapted = load_adapter(folder)
    base_state = base.state_dict()
    for name, tensor in adapted.state_dict().items():
        plain = name.replace(".base_layer.", ".")
        if "lora_" in name or "task_head" in name:
            continue
        torch.testing.assert_close(tensor, base_state[plain], rtol=0, atol=0)
    # Only the LoRA matrices and the head were trained; LoRA B left zero would be a no-op.
    lora_b = [t for n, t in adapted.state_dict().items() if "lora_B" in n]
    assert lora_b and any(t.abs().sum() > 0 for t in lora_b)
    result = work["lora"]
    assert 0 < result.trainable_parameters < result.total_parameters / 3


def test_merged_and_unmerged_adapters_agree(work, tmp_path):
    folder = work["root"] / "lora"
    unmerged = load_adapter(folder)
    merged = load_adapter(folder, merge=True)
    assert not any("lora_" in n for n in merged.state_dict())
    _, source = _source(unmerged, work["data"])
    idx = np.arange(200)
    a, b = predict(unmerged, source, idx), predict(merged, source, idx)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    np.testing.assert_allclose(a, predict(load_finetuned(folder), source, idx), rtol=0, atol=0)
    # --merge writes a plain model folder: same training, adapter folded in.
    merge_cfg = FinetuneConfig(**{**LORA.__dict__, "merge": True})
    finetune(work["base"], work["data"], tmp_path / "merged", {}, merge_cfg, n_boot=0, echo=False)
    plain = load(tmp_path / "merged")
    assert not (tmp_path / "merged" / ADAPTER_CONFIG).exists()
    np.testing.assert_allclose(predict(plain, source, idx), a, rtol=0, atol=1e-5)


def test_adapter_on_another_base_model_is_an_error(work, tmp_path):
    other = make_base(tmp_path / "other", work["data"], seed=1)
    with pytest.raises(ModelError, match="trained on base model"):
        load_adapter(work["root"] / "lora", base_dir=other)
    wider = make_base(tmp_path / "wider", work["data"], seed=0, d_model=64)
    with pytest.raises(ModelError):
        load_adapter(work["root"] / "lora", base_dir=wider)


def test_freeze_layers_keeps_the_first_blocks(work, tmp_path):
    cfg = FinetuneConfig(freeze_layers=1, epochs=1, lr=3e-3, head_init="random")
    finetune(work["base"], work["data"], tmp_path / "frozen", {}, cfg, n_boot=0, echo=False)
    before, after = load(work["base"]).state_dict(), load(tmp_path / "frozen").state_dict()
    for name in before:
        same = torch.equal(before[name], after[name])
        if name.startswith(("backbone.embed.", "backbone.blocks.0.", "head.")):
            assert same, name
    assert not torch.equal(
        before["backbone.blocks.1.mlp.up.weight"], after["backbone.blocks.1.mlp.up.weight"]
    )


def test_regression_and_probe_initialised_head(tmp_path):
    # Target: the number of G in the sequence; the LP-FT head starts at the ridge probe.
    rng = np.random.default_rng(0)
    seqs = ["".join(s) for s in rng.choice(list("ACGT"), size=(300, 12))]
    lines = [f"{s}\t{s.count('G')}" for s in seqs]
    data = tmp_path / "reg.tsv"
    data.write_text("sequence\tlabel\n" + "\n".join(lines) + "\n")
    base = make_base(tmp_path / "base", data)
    cfg = FinetuneConfig(task="regression", epochs=2, lr=1e-3, head_init="probe")
    result = finetune(base, data, tmp_path / "reg", {}, cfg, n_boot=20, echo=False)
    assert result.task == "regression" and result.test_scores.ndim == 1
    assert result.test_metrics["r2"]["value"] > 0.5
    spec = load(tmp_path / "reg").config.extra["task_head"]
    assert spec["task"] == "regression" and spec["target_std"] > 0


def test_class_weights_balance_an_imbalanced_label(tmp_path):
    from healthfm.evaluate.task_data import _task_data

    rng = np.random.default_rng(1)
    seqs = ["".join(s) for s in rng.choice(list("ACGT"), size=(400, 10))]
    labels = np.where(rng.random(400) < 0.15, "rare", "common")
    data = tmp_path / "imb.tsv"
    data.write_text(
        "sequence\tlabel\n"
        + "\n".join(f"{s}\t{c}" for s, c in zip(seqs, labels, strict=True))
        + "\n"
    )
    modality = get_modality("dna")
    samples = modality.read(data, {})
    fractions = (0.7, 0.1, 0.2)
    split_names = modality.split(samples, "healthfm", fractions)
    task = _task_data(samples, split_names, "healthfm", fractions, FinetuneConfig(), "mean")
    train = task.targets[task.splits["train"]]
    counts = np.bincount(train)
    # Each class's total weight is the same: n_c * w_c = n / k.
    np.testing.assert_allclose(counts * task.class_weights, len(train) / 2)
    assert task.spec["task"] == "binary" and task.spec["classes"] == ["common", "rare"]


# ------------------------------------------------------------------------- bad input


def _nothing_written(out):
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def test_single_class_label_column(work, tmp_path):
    data = tmp_path / "one.tsv"
    data.write_text("sequence\tlabel\nACGTAC\tx\nCCGTAA\tx\nGGGTAC\tx\n")
    with pytest.raises(DataError, match="single class") as err:
        finetune(work["base"], data, tmp_path / "out", {}, FULL, echo=False)
    assert "label" in str(err.value)
    _nothing_written(tmp_path / "out")


def test_labels_missing_for_a_split(work, tmp_path):
    # A label that is missing ("NA") in some rows: named with its row.
    text = work["data"].read_text().splitlines()
    text[5] = text[5].split("\t")[0] + "\tNA"
    bad = tmp_path / "na.tsv"
    bad.write_text("\n".join(text) + "\n")
    with pytest.raises(DataError, match="no label") as err:
        finetune(work["base"], bad, tmp_path / "out", {}, FULL, echo=False)
    assert "row 4" in str(err.value)
    _nothing_written(tmp_path / "out")
    # The train split holding one class only (every train label the same).
    modality = get_modality("dna")
    samples = modality.read(work["data"], {})
    splits = assign_splits(samples.groups, (0.7, 0.1, 0.2), "healthfm")
    labels = np.where(splits == "train", "yes", samples.labels)
    rows = [f"{s}\t{lab}" for s, lab in zip(samples.payload, labels, strict=True)]
    skewed = tmp_path / "skewed.tsv"
    skewed.write_text("sequence\tlabel\n" + "\n".join(rows) + "\n")
    with pytest.raises(DataError, match="train split holds 1 class"):
        finetune(work["base"], skewed, tmp_path / "out", {}, FULL, echo=False)
    _nothing_written(tmp_path / "out")


def test_bad_settings(work, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="freeze-layers 3"):
        finetune(work["base"], work["data"], out, {}, FinetuneConfig(freeze_layers=3), echo=False)
    with pytest.raises(ConfigError, match="no block for LoRA"):
        finetune(
            work["base"],
            work["data"],
            out,
            {},
            FinetuneConfig(lora=True, freeze_layers=2),
            echo=False,
        )
    with pytest.raises(ConfigError, match="--merge"):
        finetune(work["base"], work["data"], out, {}, FinetuneConfig(merge=True), echo=False)
    with pytest.raises(ModelError, match="not a fine-tuned model"):
        load_finetuned(work["base"])
    _nothing_written(out)


def test_cli_finetune_lora_and_errors(work, tmp_path, capsys):
    out = tmp_path / "cli-lora"
    code = cli.main(
        [
            "finetune",
            str(work["base"]),
            str(work["data"]),
            "--out",
            str(out),
            "--lora",
            "--lora-rank",
            "2",
            "--epochs",
            "1",
            "--n-boot",
            "10",
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0 and "trainable parameters" in printed and "wrote" in printed
    assert (
        (out / ADAPTER_CONFIG).is_file()
        and (out / ADAPTER_WEIGHTS).is_file()
        and (out / BASE_REF).is_file()
    )
    assert json.loads((out / ADAPTER_CONFIG).read_text())["r"] == 2
    code = cli.main(
        [
            "finetune",
            str(work["base"]),
            str(work["data"]),
            "--out",
            str(tmp_path / "x"),
            "--freeze-layers",
            "9",
        ]
    )
    assert code == 2 and "freeze-layers" in capsys.readouterr().err
    _nothing_written(tmp_path / "x")
    code = cli.main(
        [
            "evaluate",
            str(work["base"]),
            str(work["data"]),
            "--out",
            str(tmp_path / "ev"),
            "--seeds",
            "0",
            "--n-boot",
            "10",
            "--no-baselines",
            "--finetuned",
            str(out),
        ]
    )
    assert code == 0 and "model-finetune-lora" in capsys.readouterr().out


# ------------------------------------------------------------------------- single-cell


def test_singlecell_finetune_through_the_cli(tmp_path, capsys):
    # Real PBMC counts (a subset: 160 cells, 80 genes): the same CLI path as for DNA.
    import anndata as ad

    from healthfm.singlecell import pbmc68k

    a = ad.read_h5ad(pbmc68k())[:160]
    top = np.argsort(-np.asarray(a.X.sum(axis=0)).reshape(-1), kind="stable")[:80]
    a = a[:, np.sort(top)].copy()
    a = a[np.asarray(a.X.sum(axis=1)).reshape(-1) > 0].copy()
    data = tmp_path / "pbmc.h5ad"
    a.write_h5ad(data)
    opts = ["--label-column", "bulk_labels", "--total-column", "n_counts"]
    model = tmp_path / "model"
    assert (
        cli.main(
            [
                "pretrain",
                "singlecell",
                str(data),
                "--out",
                str(model),
                *opts,
                "--max-length",
                "32",
                "--preset",
                "tiny",
                "--steps",
                "2",
                "--batch-size",
                "16",
                "--checkpoint-every",
                "2",
            ]
        )
        == 0
    )
    ft = tmp_path / "ft"
    assert (
        cli.main(
            [
                "finetune",
                str(model),
                str(data),
                "--out",
                str(ft),
                *opts,
                "--epochs",
                "1",
                "--n-boot",
                "10",
            ]
        )
        == 0
    )
    assert "trainable parameters" in capsys.readouterr().out
    spec = load(ft).config.extra["task_head"]
    assert spec["task"] == "classification" and len(spec["classes"]) == spec["n_outputs"] > 2
    assert (
        cli.main(
            [
                "evaluate",
                str(model),
                str(data),
                "--out",
                str(tmp_path / "ev"),
                *opts,
                "--seeds",
                "0",
                "--n-boot",
                "10",
                "--no-baselines",
                "--finetuned",
                str(ft),
            ]
        )
        == 0
    )
    rows = json.loads((tmp_path / "ev" / "results.json").read_text())
    tuned = [r for r in rows if r["method"] == "tiny-finetune-full" and r["metric"] == "auroc"]
    probe = [r for r in rows if r["method"] == "tiny-mean+logreg" and r["metric"] == "auroc"]
    assert tuned and probe and tuned[0]["n_test"] == probe[0]["n_test"]


RESUME = FinetuneConfig(epochs=4, patience=10, lr=3e-3, batch_size=48, class_weight=True)


def _weights(folder):
    return load_file(folder / "model.safetensors")


def test_resume_after_a_stop_equals_an_uninterrupted_run(work, tmp_path):
    base, data = work["root"] / "base", work["data"]
    ref = finetune(base, data, tmp_path / "ref", {}, RESUME, n_boot=20, echo=False)
    run_dir = tmp_path / "run"
    kw = {"n_boot": 20, "echo": False, "run_dir": run_dir}
    stopped = finetune(base, data, tmp_path / "out", {}, RESUME, stop_at_epoch=2, **kw)
    assert stopped is None and not (tmp_path / "out").exists()
    state = json.loads(
        (run_dir / "checkpoints" / "step-00000002" / "trainer_state.json").read_text()
    )
    assert state["epoch"] == 2 and len(state["history"]) == 2
    resumed = finetune(base, data, tmp_path / "out", {}, RESUME, resume=True, **kw)
    assert resumed.history == ref.history
    a, b = _weights(tmp_path / "ref"), _weights(tmp_path / "out")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_a_checkpoint_of_other_settings(work, tmp_path):
    from healthfm.errors import CheckpointError

    base, data = work["root"] / "base", work["data"]
    kw = {"n_boot": 20, "echo": False, "run_dir": tmp_path / "run"}
    finetune(base, data, tmp_path / "out", {}, RESUME, stop_at_epoch=1, **kw)
    other = FinetuneConfig(**{**RESUME.__dict__, "lr": 1e-4})
    with pytest.raises(CheckpointError, match="another run configuration"):
        finetune(base, data, tmp_path / "out", {}, other, resume=True, **kw)
    assert not (tmp_path / "out").exists()


def _torchrun(n: int, argv: list[str]) -> str:
    import subprocess
    import sys

    from train.launch import env

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc-per-node={n}", "-m", "healthfm.cli", *argv]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=900, env=env()
    )  # a hang guard: loaded machines are slow
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_two_torchrun_processes_match_one(work, tmp_path):
    base, data = work["root"] / "base", work["data"]
    # Batches of 48 split over 2 processes, replicated (DDP) or sharded (FSDP2): the
    # gradient must be the one-process gradient.
    argv = ["finetune", str(base), str(data), "--epochs", "2", "--batch-size", "48"]
    argv += ["--lr", "3e-3", "--no-checkpoints", "--n-boot", "10", "--device", "cpu"]
    outs = {}
    for n, strategy in ((1, "ddp"), (2, "ddp"), (2, "fsdp")):
        out = tmp_path / f"p{n}-{strategy}"
        _torchrun(n, [*argv, "--strategy", strategy, "--out", str(out)])
        outs[n, strategy] = _weights(out)
    ref = outs[1, "ddp"]
    for key in ((2, "ddp"), (2, "fsdp")):
        assert outs[key].keys() == ref.keys()
        for k in ref:
            torch.testing.assert_close(outs[key][k], ref[k], rtol=1e-4, atol=1e-5, msg=k)


def test_lora_under_fsdp_stops_resumes_and_matches_one_process(work, tmp_path):
    # LoRA sharded over 2 processes: checkpoints of the trained tensors only (gathered from
    # the shards), a stop after epoch 1, a resume that scatters them back, and an adapter
    # folder gathered on rank 0, equal to the one-process run's.
    base, data = work["root"] / "base", work["data"]
    cfg = FinetuneConfig(lora=True, lora_rank=4, epochs=2, lr=3e-3, batch_size=48)
    ref = finetune(base, data, tmp_path / "ref", {}, cfg, n_boot=10, echo=False)
    out, run_dir = tmp_path / "out", tmp_path / "run"
    argv = ["finetune", str(base), str(data), "--lora", "--lora-rank", "4", "--epochs", "2"]
    argv += ["--batch-size", "48", "--lr", "3e-3", "--n-boot", "10", "--device", "cpu"]
    argv += ["--strategy", "fsdp", "--run-dir", str(run_dir), "--out", str(out)]
    _torchrun(2, [*argv, "--stop-at-epoch", "1"])
    assert not out.exists()
    state = json.loads(
        (run_dir / "checkpoints" / "step-00000001" / "trainer_state.json").read_text()
    )
    assert state["epoch"] == 1 and state["world_size"] == 2 and state["strategy"] == "fsdp"
    assert state["weights"] == "trainable"
    assert "resumed after epoch 1" in _torchrun(2, [*argv, "--resume"])
    got, want = load_file(out / ADAPTER_WEIGHTS), load_file(tmp_path / "ref" / ADAPTER_WEIGHTS)
    assert got.keys() == want.keys() and any("lora_B" in k for k in got)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5, msg=k)
    history = json.loads((out / BASE_REF).read_text())["finetune"]["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    for h, r in zip(history, ref.history, strict=True):
        assert h["val_loss"] == pytest.approx(r["val_loss"], rel=1e-4)
        assert h["train_loss"] == pytest.approx(r["train_loss"], rel=1e-4)


def test_a_fresh_run_replaces_an_earlier_runs_checkpoints_only_with_overwrite(work, tmp_path):
    base, data = work["root"] / "base", work["data"]
    kw = {"n_boot": 10, "echo": False, "run_dir": tmp_path / "run"}
    three = FinetuneConfig(**{**RESUME.__dict__, "epochs": 3})
    two = FinetuneConfig(**{**RESUME.__dict__, "epochs": 2})
    finetune(base, data, tmp_path / "a", {}, three, **kw)  # leaves an epoch-3 checkpoint
    # Another run over that run folder: refused without --overwrite (never discarded silently).
    with pytest.raises(ConfigError, match="--overwrite"):
        finetune(base, data, tmp_path / "b", {}, two, stop_at_epoch=1, **kw)
    assert (
        finetune(base, data, tmp_path / "b", {}, two, stop_at_epoch=1, overwrite=True, **kw) is None
    )
    resumed = finetune(base, data, tmp_path / "b", {}, two, resume=True, **kw)
    ref = finetune(base, data, tmp_path / "ref", {}, two, n_boot=10, echo=False)
    assert resumed.history == ref.history and len(ref.history) == 2
    with pytest.raises(ConfigError, match="--no-checkpoints"):
        finetune(base, data, tmp_path / "c", {}, two, stop_at_epoch=1, n_boot=10, echo=False)
