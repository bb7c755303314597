import itertools
import json

import numpy as np
import pytest
import torch

from healthfm.errors import CheckpointError, ConfigError
from healthfm.model.heads import IGNORE_INDEX
from healthfm.tokenizer import MASK_ID
from healthfm.tokens import write_store
from healthfm.train.checkpoint import checkpoint_dirs
from healthfm.train.data import EpochBatches, TaskEpochs, collate
from healthfm.train.objectives import masked_tokens, next_tokens
from healthfm.train.trainer import TrainConfig, Trainer
from helpers import make_chunk, tiny_model


def _config(**kw):
    base = dict(
        steps=8,
        batch_size=16,
        warmup_steps=2,
        eval_every=4,
        checkpoint_every=4,
        log_every=1,
        lr=3e-3,
    )
    return TrainConfig(**{**base, **kw})


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_loss_decreases_and_logs(store, tmp_path):
    model = tiny_model()
    trainer = Trainer(
        model, store, _config(steps=40, eval_every=20), tmp_path / "run", val_store=store
    )
    summary = trainer.fit()
    rows = [
        json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()
    ]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    assert any("val_loss" in r for r in rows)
    assert summary["steps"] == 40 and summary["val_loss"] is not None
    assert len(checkpoint_dirs(tmp_path / "run" / "checkpoints")) == 2  # keep_checkpoints


@pytest.mark.parametrize("objective", ["masked", "causal"])
def test_resume_is_exact(store, tmp_path, objective):
    straight = tiny_model(objective)
    Trainer(straight, store, _config(), tmp_path / "a").fit()
    interrupted = tiny_model(objective)
    Trainer(interrupted, store, _config(), tmp_path / "b").fit(stop_at=4)
    resumed = tiny_model(objective)  # fresh process: new model, state from the checkpoint
    summary = Trainer(resumed, store, _config(), tmp_path / "b").fit(resume=True)
    assert summary["resumed"]
    for k, v in straight.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    log = [json.loads(x) for x in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == list(range(1, 9))


def test_gradient_accumulation_matches_full_batch(tmp_path):
    # Equal-length samples and a causal objective (no masking draw): the mean of the
    # micro-batch losses is exactly the full-batch loss, so the updates must agree.
    fixed = write_store(tmp_path / "s", [make_chunk(64, 0, min_len=20, max_len=20)], "h")
    full = tiny_model("causal")
    Trainer(full, fixed, _config(steps=3, checkpoint_every=0, eval_every=0), tmp_path / "a").fit()
    accum = tiny_model("causal")
    Trainer(
        accum,
        fixed,
        _config(steps=3, micro_batch_size=4, checkpoint_every=0, eval_every=0),
        tmp_path / "b",
    ).fit()
    for k, v in full.state_dict().items():
        torch.testing.assert_close(v, accum.state_dict()[k], rtol=1e-4, atol=1e-5)


def test_bf16_autocast_trains(store, tmp_path):
    model = tiny_model()
    summary = Trainer(model, store, _config(steps=4, bf16=True), tmp_path / "r").fit()
    assert np.isfinite(summary["train_loss"])


def test_corrupt_checkpoint_is_refused(store, tmp_path):
    Trainer(tiny_model(), store, _config(), tmp_path / "r").fit(stop_at=4)
    ckpt = checkpoint_dirs(tmp_path / "r" / "checkpoints")[-1]
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match="checksum"):
        Trainer(tiny_model(), store, _config(), tmp_path / "r").fit(resume=True)


def test_checkpoint_from_other_config_is_refused(store, tmp_path):
    Trainer(tiny_model(), store, _config(), tmp_path / "r").fit(stop_at=4)
    other = tiny_model(dropout=0.1)
    with pytest.raises(CheckpointError, match="model_config_hash"):
        Trainer(other, store, _config(), tmp_path / "r").fit(resume=True)
    with pytest.raises(CheckpointError, match="batch_size"):
        Trainer(tiny_model(), store, _config(batch_size=32), tmp_path / "r").fit(resume=True)


def test_interrupted_save_keeps_last_good_checkpoint(store, tmp_path, monkeypatch):
    Trainer(tiny_model(), store, _config(), tmp_path / "r").fit(stop_at=4)
    import healthfm.train.checkpoint as ck

    def crash(*a, **k):
        raise KeyboardInterrupt  # a kill arriving during the optimizer-state write

    monkeypatch.setattr(ck.torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        Trainer(tiny_model(), store, _config(), tmp_path / "r").fit(resume=True)
    monkeypatch.undo()
    dirs = checkpoint_dirs(tmp_path / "r" / "checkpoints")
    assert [d.name for d in dirs] == ["step-00000004"]
    assert not [p for p in (tmp_path / "r" / "checkpoints").iterdir() if p.name.startswith(".")]
    summary = Trainer(tiny_model(), store, _config(), tmp_path / "r").fit(resume=True)
    assert summary["steps"] == 8


def test_batch_size_must_divide(store, tmp_path):
    with pytest.raises(ConfigError):
        Trainer(tiny_model(), store, _config(batch_size=16, micro_batch_size=5), tmp_path / "r")


def test_epoch_batches_cover_each_epoch_once():
    batches = EpochBatches(100, 10, seed=3)
    first_epoch = np.concatenate([batches.part(p) for p in range(10)])
    assert sorted(first_epoch) == list(range(100))
    parts = np.concatenate([batches.part(2, i, 5) for i in range(5)])
    np.testing.assert_array_equal(parts, batches.part(2))
    assert not np.array_equal(batches.part(10), batches.part(0))  # new epoch, new order


def test_task_epochs_keep_every_row_and_resume_anywhere():
    rows = np.arange(100, 123)  # 23 rows, batches of 5: 5 steps per epoch, the last of 3
    plan = TaskEpochs(rows, 5, seed=3, first_epoch=1)
    assert plan.steps_per_epoch == 5 and len(plan.batch(4)) == 3
    epoch = np.concatenate([plan.batch(p) for p in range(5)])
    np.testing.assert_array_equal(epoch, rows[np.random.default_rng([3, 1]).permutation(23)])
    assert not np.array_equal(plan.batch(5), plan.batch(0))  # new epoch, new order
    # One stream: epoch e is the e-th permutation of one generator, whatever is asked first.
    stream = TaskEpochs(np.arange(7), 7, seed=2, stream=True)
    rng = np.random.default_rng(2)
    expected = [rng.permutation(7) for _ in range(3)]
    for e in (2, 0, 1, 2):
        np.testing.assert_array_equal(stream.batch(e), expected[e])


def test_parts_split_a_short_batch_and_keep_every_part_busy(store, tmp_path):
    # A summed loss normalised by the whole batch, split into more parts (micro-steps ×
    # processes) than the batch has rows: an empty part runs the first row with scale
    # zero, so every rank would still take part in the gradient reduction.
    plan = TaskEpochs(np.arange(5), 4, seed=0)  # the second batch holds one row
    config = _config(steps=2, batch_size=4, micro_batch_size=1)
    trainer = Trainer(tiny_model(), store, config, None, batches=plan, normaliser=len)
    assert trainer.accumulation == 4
    rows, parts = trainer._parts(0)
    assert [scale for *_, scale in parts] == [1.0] * 4  # 4 parts / normaliser 4
    rows, parts = trainer._parts(1)
    assert len(rows) == 1 and [scale for *_, scale in parts] == [4.0, 0.0, 0.0, 0.0]
    assert all(np.array_equal(idx, rows) for _, idx, _ in parts)


def test_collate_pads_and_truncates(store):
    batch = collate(store, np.array([0, 1, 2]), max_len=8)
    assert batch["ids"].shape[1] <= 8
    lengths = store.lengths[[0, 1, 2]]
    assert batch["attention_mask"].sum(1).tolist() == np.minimum(lengths, 8).tolist()
    assert (batch["ids"][~batch["attention_mask"]] == 0).all()
    tail = collate(store, np.array([0]), max_len=4, truncate="tail")
    np.testing.assert_array_equal(tail["ids"][0].numpy(), store[0]["ids"][-4:])


def test_masking_and_next_token_targets(store):
    batch = collate(store, np.arange(32))
    out = masked_tokens(batch, torch.Generator().manual_seed(0), vocab_size=12, mask_prob=0.15)
    picked = out["labels"] != IGNORE_INDEX
    assert picked.any(1).all()
    assert (batch["ids"][picked] >= 5).all()  # never a special or a pad
    frac_masked = (out["ids"][picked] == MASK_ID).float().mean()
    assert 0.6 < frac_masked < 0.95
    again = masked_tokens(batch, torch.Generator().manual_seed(0), vocab_size=12)
    assert torch.equal(again["ids"], out["ids"])
    causal = next_tokens(batch)
    real = batch["attention_mask"]
    assert torch.equal(causal["labels"][:, :-1][real[:, 1:]], batch["ids"][:, 1:][real[:, 1:]])
    assert (causal["labels"][:, -1] == IGNORE_INDEX).all()


def test_lr_schedule():
    config = TrainConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert config.lr_at(0) == pytest.approx(0.1)
    assert config.lr_at(9) == pytest.approx(1.0)
    assert config.lr_at(99) == pytest.approx(0.1, abs=0.01)
    assert config.lr_at(55) < config.lr_at(20)


class _ShuffledSource:
    """A batch source whose batches depend on the generator (like image augmentation)."""

    def __init__(self, store):
        from healthfm.train.data import StoreSource

        self.inner = StoreSource(store, max_len=64)
        self.fingerprint = self.inner.fingerprint

    def __len__(self):
        return len(self.inner)

    def batch(self, indices, generator):
        batch = self.inner.batch(indices, generator)
        # Random token dropout driven by the generator: a stand-in for augmentation.
        keep = torch.rand(batch["ids"].shape, generator=generator) > 0.2
        batch["ids"] = torch.where(
            keep | (batch["ids"] < 5), batch["ids"], torch.full_like(batch["ids"], 5)
        )
        return batch


def test_dataloader_workers_give_the_same_run(store, tmp_path):
    # Augmentation built in worker processes must equal the in-process path, bitwise,
    # and a resumed worker run must continue exactly.
    runs = {}
    for workers in (0, 2):
        model = tiny_model()
        Trainer(
            model, _ShuffledSource(store), _config(num_workers=workers), tmp_path / f"w{workers}"
        ).fit()
        runs[workers] = model.state_dict()
    resumed = tiny_model()
    Trainer(tiny_model(), _ShuffledSource(store), _config(num_workers=2), tmp_path / "r").fit(
        stop_at=4
    )
    Trainer(resumed, _ShuffledSource(store), _config(num_workers=2), tmp_path / "r").fit(
        resume=True
    )
    for k, v in runs[0].items():
        assert torch.equal(v, runs[2][k]), k
        assert torch.equal(v, resumed.state_dict()[k]), k


def test_early_eta_and_the_cpu_shrink_hint(store, tmp_path, capsys, monkeypatch):
    # After the first 3 steps (before the first 10-step window), the run's estimated wall
    # time; on a CPU, a run estimated past 15 minutes also says how to shrink it.
    from healthfm.train import trainer as trainer_module

    Trainer(tiny_model(), store, _config(steps=6, log_every=10), tmp_path / "a").fit()
    err = capsys.readouterr().err
    assert "first 3 step(s) took" in err and "the 6 steps will take about" in err
    assert "shrink" not in err  # a short run
    clock = itertools.count(0, 100)  # every reading of the clock: 100 s later
    monkeypatch.setattr(trainer_module.time, "perf_counter", lambda: float(next(clock)))
    Trainer(tiny_model(), store, _config(steps=1000, log_every=10), tmp_path / "b").fit(stop_at=20)
    err = capsys.readouterr().err
    assert "first 1 step(s) took" in err and "the 20 steps will take" in err
    assert "without a GPU, shrink the run" in err
    assert "--steps" in err and "--max-length" in err
