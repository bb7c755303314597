"""A real training process for the distributed and fault tests (run directly or by torchrun).

Usage: ``python dist_worker.py '<json settings>'``. Settings: ``store``, ``run_dir``,
``steps``, ``batch_size``, ``micro_batch_size``, ``strategy``, ``objective``,
``checkpoint_every``, ``resume``, ``stop_at``, ``report_threads`` (write the names of
the threads left after shutdown to ``run_dir/threads-rank<r>.json``), ``tiles`` (a tile
folder: MAE pretraining of a tiny ViT on augmented tiles instead of a token store), and
test hooks:

- ``slow``: seconds to sleep per micro-batch, so a parent can kill the run mid-way;
- ``crash_at``: on the first attempt under torchrun (``TORCHELASTIC_RESTART_COUNT`` 0),
  rank 0 dies with SIGKILL when that step's batch is drawn;
- ``hang_in_save``: after the first checkpoint, the next save prints ``SAVING`` once its
  weights file is written and then sleeps, so a parent can kill it mid-save.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for helpers

import numpy as np
import torch

import healthfm.train.checkpoint as ck
from healthfm.tokens import TokenStore
from healthfm.train import distributed as D
from healthfm.train.data import StoreSource
from healthfm.train.trainer import TrainConfig, Trainer
from helpers import tiny_model

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)


class HookedSource(StoreSource):
    """The store source, slowed down or crashing on demand (a test hook)."""

    def __init__(self, store, max_len, slow: float, crash_at: int | None, rank: int):
        super().__init__(store, max_len)
        self.slow, self.crash_at, self.rank, self.trainer = slow, crash_at, rank, None

    def batch(self, indices, generator=None):
        if self.slow:
            time.sleep(self.slow)
        first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        if (
            self.crash_at is not None
            and first_attempt
            and self.rank == 0
            and self.trainer.step == self.crash_at
        ):
            os.kill(os.getpid(), signal.SIGKILL)
        return super().batch(indices, generator)


def main(settings: dict) -> None:
    info = D.init_distributed("cpu")
    train(settings, info)
    D.shutdown(info)  # the trainer and its DDP/FSDP module are out of scope here
    if settings.get("report_threads"):  # a file per rank: two ranks' stdout lines interleave
        names = _thread_names()
        # Gloo's transport loop exits just after its device is freed; give it 2 s (the
        # interpreter would shut down much later), then report what is still alive.
        deadline = time.monotonic() + 2.0
        while any("gloo" in n for n in names) and time.monotonic() < deadline:
            time.sleep(0.05)
            names = _thread_names()
        report = Path(settings["run_dir"]) / f"threads-rank{info.rank}.json"
        report.write_text(json.dumps(sorted(names)))


def _thread_names() -> list[str]:
    return [
        (Path("/proc/self/task") / t / "comm").read_text().strip()
        for t in os.listdir("/proc/self/task")
    ]


def tile_parts(folder: str):
    """A tiny ViT for MAE, a :class:`TileSource` (augmented) over the first 16 tiles of
    ``folder`` and one (not augmented) over the other 8: what pathology pretraining runs."""
    from healthfm.model import FoundationModel, ModelConfig
    from healthfm.pathology import MODALITY, TileSource
    from healthfm.pathology.tokenizer import PatchTokenizer

    tok = PatchTokenizer(32, 8)
    tiles = MODALITY.read(folder, {}).payload
    torch.manual_seed(0)
    config = ModelConfig(
        modality="pathology",
        vocab_size=tok.vocab_size,
        d_model=32,
        n_layers=2,
        n_heads=2,
        d_ff=64,
        max_len=tok.n_tokens,
        objective="mae",
        input_dim=tok.input_dim,
    )
    train = TileSource(tiles, tok, np.arange(16), augment=True)
    val = TileSource(tiles, tok, np.arange(16, 24), augment=False)
    return FoundationModel(config), train, val


def train(settings: dict, info: D.DistInfo) -> None:
    if settings.get("tiles"):
        model, source, val = tile_parts(settings["tiles"])
        config = TrainConfig(
            steps=settings["steps"],
            batch_size=settings["batch_size"],
            micro_batch_size=settings.get("micro_batch_size"),
            warmup_steps=1,
            lr=3e-3,
            mask_prob=0.75,
            eval_every=settings.get("eval_every", 0),
            eval_batches=3,
            checkpoint_every=settings.get("checkpoint_every", 0),
            log_every=1,
            progress=False,
        )
        trainer = Trainer(
            model,
            source,
            config,
            settings["run_dir"],
            val_store=val,
            dist_info=info,
            strategy=settings.get("strategy", "ddp"),
        )
        summary = trainer.fit(resume=settings.get("resume", False))
        if info.is_main:
            print("DONE", json.dumps(summary), flush=True)
        return
    store = TokenStore(settings["store"])
    model = tiny_model(settings.get("objective", "masked"))
    source = HookedSource(
        store, model.config.max_len, settings.get("slow", 0.0), settings.get("crash_at"), info.rank
    )
    config = TrainConfig(
        steps=settings["steps"],
        batch_size=settings["batch_size"],
        micro_batch_size=settings.get("micro_batch_size"),
        warmup_steps=2,
        lr=3e-3,
        eval_every=settings.get("eval_every", 0),
        eval_batches=3,
        checkpoint_every=settings.get("checkpoint_every", 0),
        keep_checkpoints=settings.get("keep", 2),
        log_every=1,
        progress=False,
    )
    trainer = Trainer(
        model,
        source,
        config,
        settings["run_dir"],
        val_store=store if settings.get("eval_every") else None,
        dist_info=info,
        strategy=settings.get("strategy", "ddp"),
    )
    source.trainer = trainer
    if settings.get("hang_in_save"):
        real_save_file, saves = ck.save_file, []

        def hanging_save_file(tensors, path):
            real_save_file(tensors, path)
            saves.append(path)
            if len(saves) > 1:  # the first save completes; the second hangs half-written
                print("SAVING", flush=True)
                time.sleep(60)

        ck.save_file = hanging_save_file
    summary = trainer.fit(resume=settings.get("resume", False), stop_at=settings.get("stop_at"))
    if info.is_main:
        print("DONE", json.dumps(summary), flush=True)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
