"""The training loop: one readable loop for every modality and objective.

AdamW, linear warm-up then cosine decay, gradient clipping, gradient accumulation,
optional bf16 autocast, periodic held-out evaluation, a progress bar, a JSONL metrics log,
atomic checkpoints and exact resume. Single process by default; under torchrun each rank
trains on its slice of every global batch (see :mod:`healthfm.train.distributed`).
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from healthfm.errors import CheckpointError, ConfigError
from healthfm.fsutil import json_hash
from healthfm.model.heads import FoundationModel
from healthfm.tokens import TokenStore
from healthfm.train import distributed as D
from healthfm.train.checkpoint import (
    checkpoint_dirs,
    clean_temporary,
    load_checkpoint,
    save_checkpoint,
)
from healthfm.train.data import BatchSource, EpochBatches, SourceBatches, as_source
from healthfm.train.objectives import prepare

LOG_NAME = "train_log.jsonl"


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping settings.

    Attributes
    ----------
    steps
        Optimizer steps.
    batch_size
        Global batch size: samples per optimizer step, summed over processes and
        accumulation micro-steps (so it stays the same whatever the process count).
    micro_batch_size
        Samples per forward pass on one process; ``None`` means the whole per-process
        share of the batch (no accumulation).
    lr, weight_decay, betas
        AdamW settings (no weight decay on biases, norms and embeddings).
    warmup_steps, min_lr_ratio
        Linear warm-up, then cosine decay to ``lr * min_lr_ratio``.
    grad_clip
        Maximum global gradient norm (0 disables).
    bf16
        bf16 autocast for the forward pass.
    mask_prob
        Fraction of tokens masked by the masked-token objective.
    eval_every, eval_batches
        Held-out loss every N steps over the first M batches of the validation store.
    checkpoint_every, keep_checkpoints
        Save every N steps (and at the end); keep the last K.
    log_every
        Steps between JSONL log rows.
    seed
        Seeds data order and masking; the caller seeds initialization.
    num_workers
        DataLoader workers.
    truncate
        "head" or "tail": which end of a too-long sample to keep.
    progress
        Show a progress bar (default: only when stderr is a terminal).
    pack
        Pack the samples of each micro-batch into rows of ``max_len`` tokens with a
        block-diagonal attention mask (token stores only) instead of padding each sample
        to the longest one: the same samples and targets, far fewer pad tokens when
        lengths are skewed.
    """

    steps: int = 1000
    batch_size: int = 64
    micro_batch_size: int | None = None
    lr: float = 1e-3
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    bf16: bool = False
    mask_prob: float = 0.15
    eval_every: int = 200
    eval_batches: int = 20
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0
    num_workers: int = 0
    truncate: str = "head"
    progress: bool | None = None
    pack: bool = False

    def lr_at(self, step: int) -> float:
        """Learning rate for optimizer step ``step`` (0-based)."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        span = max(1, self.steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.lr * (self.min_lr_ratio + (1.0 - self.min_lr_ratio) * cosine)


def _seed(*parts: int) -> int:
    return int(
        np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0]
    )


def _generator(*parts: int) -> torch.Generator:
    # One reproducible stream per (seed, step, part): masks do not depend on process count.
    seed = int(
        np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0]
    )
    return torch.Generator().manual_seed(seed)


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (decay if param.ndim >= 2 and "embed.tokens" not in name else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


class Trainer:
    """Pretrain a :class:`FoundationModel` on a token store.

    Parameters
    ----------
    model
        The model, freshly initialised (seed it before building it) or to continue.
    train_store
        Training data: a token store or any :class:`~healthfm.train.data.BatchSource`.
    config
        :class:`TrainConfig`.
    run_dir
        Folder for ``checkpoints/`` and ``train_log.jsonl``.
    val_store
        Held-out data (store or source) for the periodic evaluation, or None.
    augment
        Optional ``f(batch, generator) -> batch`` applied before the objective.
    dist_info
        Process placement; read from the environment when None.
    strategy
        "ddp" (replicas) or "fsdp" (FSDP2 sharding of parameters, gradients and optimizer
        state); only matters under torchrun. Checkpoints are the same either way.
    """

    def __init__(
        self,
        model: FoundationModel,
        train_store: TokenStore | BatchSource,
        config: TrainConfig,
        run_dir: str | Path,
        val_store: TokenStore | BatchSource | None = None,
        augment=None,
        dist_info: D.DistInfo | None = None,
        strategy: str = "ddp",
    ) -> None:
        self.config = config
        self.info = dist_info or D.init_distributed()
        self.model = model.to(self.info.device)
        self.train_store = as_source(
            train_store, model.config.max_len, config.truncate, pack=config.pack
        )
        self.val_store = (
            as_source(val_store, model.config.max_len, config.truncate)
            if val_store is not None
            else None
        )
        self.augment = augment
        self.run_dir = Path(run_dir)
        if strategy not in D.STRATEGIES:
            raise ConfigError(f"unknown strategy {strategy!r}; choose one of {D.STRATEGIES}")
        self.strategy = strategy
        world = self.info.world_size
        micro = config.micro_batch_size or config.batch_size // world
        if config.batch_size % (micro * world):
            raise ConfigError(
                f"batch size {config.batch_size} is not a multiple of micro batch {micro} × {world} processes"
            )
        if config.pack and getattr(model, "_loss_fn", None) is not None:
            raise ConfigError(
                f"packing needs a token-level objective (masked or causal), not {model.config.objective!r}"
            )
        self.micro_batch_size = micro
        self.accumulation = config.batch_size // (micro * world)
        self.batches = EpochBatches(len(train_store), config.batch_size, config.seed)
        # FSDP replaces the parameters by sharded ones: build the optimizer afterwards.
        self.wrapped = D.wrap_model(PretrainingLoss(self.model), self.info, strategy)
        self.optimizer = torch.optim.AdamW(
            _param_groups(self.model, config.weight_decay),
            lr=config.lr,
            betas=config.betas,
            fused=False,
        )
        self.step = 0
        self._prefetch = None
        self.position = 0
        self.identity = {
            "model_config_hash": json_hash(self.model.config.to_dict()),
            "tokenizer_hash": self.train_store.fingerprint,
            "batch_size": config.batch_size,
            "seed": config.seed,
        }

    # ------------------------------------------------------------------ state
    @property
    def checkpoint_root(self) -> Path:
        """Where checkpoints go."""
        return self.run_dir / "checkpoints"

    def save(self) -> Path | None:
        """Checkpoint the current step.

        Every rank takes part (sharded states are gathered); only the main rank writes,
        full tensors keyed by parameter name, so any process count can load it.
        """
        path = None
        model_state = D.full_model_state(self.model, self.info)
        optimizer_state = D.full_optimizer_state(self.model, self.optimizer, self.info)
        rng_states = D.gather_objects(torch.get_rng_state(), self.info)
        if self.info.is_main:
            state = {
                **self.identity,
                "position": self.position,
                "world_size": self.info.world_size,
                "strategy": self.strategy,
                "train_config": _jsonable(asdict(self.config)),
            }
            path = save_checkpoint(
                self.checkpoint_root,
                self.step,
                model_state,
                optimizer_state,
                state,
                keep=self.config.keep_checkpoints,
                rng_states=rng_states,
            )
        D.barrier(self.info)
        return path

    def export_model(self) -> FoundationModel | None:
        """The trained model as a plain (unsharded, unwrapped) module, for saving.

        Collective under FSDP: every rank calls it; the main rank gets a fresh model
        holding the gathered weights, the others None. Without FSDP it is the model itself.
        """
        if not D.is_sharded(self.model):
            return self.model
        state = D.full_model_state(self.model, self.info)
        if not self.info.is_main:
            return None
        plain = FoundationModel(self.model.config)
        plain.load_state_dict(state, strict=True)
        return plain

    def resume(self, path: str | Path | None = None) -> bool:
        """Restore the latest (or the given) checkpoint; False if there is none."""
        if path is None:
            if self.info.is_main:
                clean_temporary(self.checkpoint_root)  # leftovers of a save that was killed
            D.barrier(self.info)
            found = checkpoint_dirs(self.checkpoint_root)
            if not found:
                return False
            path = found[-1]
        ckpt = load_checkpoint(path, expect=self.identity)
        try:
            D.load_full_state(self.model, self.optimizer, ckpt["model"], ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"checkpoint does not fit this model: {exc}", file=path) from exc
        # Each rank continues its own RNG stream when the process count is unchanged.
        ranks = ckpt["rng"].get("ranks") or [ckpt["rng"]["torch"]]
        torch.set_rng_state(
            ranks[self.info.rank] if len(ranks) == self.info.world_size else ranks[0]
        )
        self.step = int(ckpt["state"]["step"])
        self.position = int(ckpt["state"]["position"])
        if self.info.is_main:
            _truncate_log(self.run_dir / LOG_NAME, self.step)
        return True

    # ------------------------------------------------------------------ loop
    def _autocast(self):
        if not self.config.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.info.device.type, dtype=torch.bfloat16)

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.info.device, non_blocking=True) for k, v in batch.items()}

    def _micro_batch(
        self, step: int, micro: int
    ) -> tuple[dict[str, torch.Tensor], torch.Generator]:
        part = micro * self.info.world_size + self.info.rank
        parts = self.accumulation * self.info.world_size
        gen = _generator(self.config.seed, 1, step, part)
        if self._prefetch is not None:
            batch = next(self._prefetch)  # built by a DataLoader worker from the same plan
        else:
            indices = self.batches.part(self.position, part, parts)
            # Its own stream (not ``gen``): identical whether a worker builds it or not.
            source_gen = torch.Generator().manual_seed(_seed(self.config.seed, 3, step, part))
            batch = self.train_store.batch(indices, source_gen)
        if self.augment is not None:
            batch = self.augment(batch, gen)
        batch = prepare(
            batch,
            self.model.config.objective,
            gen,
            self.model.config.vocab_size,
            self.config.mask_prob,
        )
        return self._to_device(batch), gen

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean held-out loss over the first ``eval_batches`` batches of the val store."""
        if self.val_store is None or len(self.val_store) == 0:
            return None
        self.model.eval()
        total, count = 0.0, 0
        size = self.micro_batch_size
        world, rank = self.info.world_size, self.info.rank
        n_batches = min(self.config.eval_batches, math.ceil(len(self.val_store) / size))
        # Batches are dealt round-robin; under FSDP every rank must run as many forward
        # passes as the others (each one all-gathers), so a rank without a batch runs
        # batch 0 again and gives it zero weight.
        sharded = D.is_sharded(self.model)
        for r in range(math.ceil(n_batches / world)):
            b = r * world + rank
            if b >= n_batches and not sharded:
                continue
            weight = 1.0 if b < n_batches else 0.0
            b = b if b < n_batches else 0
            idx = np.arange(b * size, min((b + 1) * size, len(self.val_store)))
            gen = _generator(self.config.seed, 2, b)
            batch = self.val_store.batch(idx, None)
            batch = prepare(
                batch,
                self.model.config.objective,
                gen,
                self.model.config.vocab_size,
                self.config.mask_prob,
            )
            with self._autocast():
                # Sharded: through the FSDP hooks; otherwise the bare module (no DDP hooks).
                module = self.wrapped if sharded else D.unwrap(self.wrapped)
                loss, n = module(self._to_device(batch))
            total += float(loss) * n * weight
            count += n * weight
        sums = D.all_reduce_sum(
            torch.tensor([total, float(count)], dtype=torch.float64, device=self.info.device),
            self.info,
        )
        self.model.train()
        return float(sums[0] / sums[1]) if sums[1] > 0 else None

    def fit(self, resume: bool = False, stop_at: int | None = None) -> dict[str, Any]:
        """Train to ``config.steps``; with ``resume``, continue from the latest checkpoint.

        ``stop_at`` ends this call early at that step (after checkpointing it), as a job
        with a time limit would; a later ``fit(resume=True)`` continues exactly.

        Returns
        -------
        dict
            Summary: steps, final train and val loss, tokens/s, wall seconds.
        """
        cfg = self.config
        resumed = self.resume() if resume else False
        if self.info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.model.train()
        show = cfg.progress if cfg.progress is not None else sys.stderr.isatty()
        bar = tqdm(
            total=cfg.steps,
            initial=self.step,
            disable=not (show and self.info.is_main),
            desc="pretrain",
            unit="step",
            dynamic_ncols=True,
        )
        log_path = self.run_dir / LOG_NAME
        window_loss, window_steps, window_tokens = 0.0, 0, 0
        t_window = time.perf_counter()
        t_start = time.perf_counter()
        tokens_total = 0
        last_loss = float("nan")
        val_loss = None
        end = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
        loader = self._worker_loader(end) if cfg.num_workers > 0 else None
        self._prefetch = iter(loader) if loader is not None else None
        while self.step < end:
            result = self.train_step()
            last_loss, grad_norm = result["loss"], result["grad_norm"]
            window_tokens += result["tokens"]
            window_loss += last_loss
            window_steps += 1
            bar.update(1)
            bar.set_postfix(loss=f"{last_loss:.4f}")
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                elapsed = time.perf_counter() - t_window
                tokens = window_tokens
                tokens_total += tokens
                self._log(
                    log_path,
                    {
                        "step": self.step,
                        "loss": window_loss / window_steps,
                        "lr": cfg.lr_at(self.step - 1),
                        "grad_norm": grad_norm,
                        "tokens_per_s": tokens / max(elapsed, 1e-9),
                    },
                )
                window_loss, window_steps, window_tokens = 0.0, 0, 0
                t_window = time.perf_counter()
            if cfg.eval_every and (self.step % cfg.eval_every == 0 or self.step == cfg.steps):
                val_loss = self.evaluate()
                if val_loss is not None:
                    self._log(log_path, {"step": self.step, "val_loss": val_loss})
            if (cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0) or self.step in (
                cfg.steps,
                end,
            ):
                self.save()
        bar.close()
        self._prefetch = None
        del loader  # stops the workers
        wall = time.perf_counter() - t_start
        return {
            "steps": self.step,
            "resumed": resumed,
            "train_loss": last_loss,
            "val_loss": val_loss,
            "tokens_per_s": tokens_total / wall if wall > 0 else None,
            "wall_seconds": wall,
            "world_size": self.info.world_size,
        }

    def _worker_loader(self, end: int) -> torch.utils.data.DataLoader:
        """Batches of steps ``self.step .. end`` built in ``num_workers`` DataLoader workers.

        The plan (indices and generator seed of every micro-batch, in the order the loop
        consumes them) is fixed up front from the step and data position, so batches and
        augmentations are the same as without workers, and a resumed run continues exactly.
        """
        world, rank = self.info.world_size, self.info.rank
        parts = self.accumulation * world
        plan = []
        for offset, step in enumerate(range(self.step, end)):
            for micro in range(self.accumulation):
                part = micro * world + rank
                indices = self.batches.part(self.position + offset, part, parts)
                plan.append((indices, _seed(self.config.seed, 3, step, part)))
        return torch.utils.data.DataLoader(
            SourceBatches(self.train_store),
            sampler=plan,
            batch_size=None,
            num_workers=self.config.num_workers,
            prefetch_factor=4,
        )

    def train_step(self) -> dict[str, Any]:
        """One optimizer step: every micro-batch of this rank, clipping, AdamW, then step += 1.

        Returns
        -------
        dict
            ``loss`` (mean over micro-batches and ranks), ``tokens`` (real tokens of the
            whole global batch, all ranks) and ``grad_norm`` (before clipping).
        """
        cfg = self.config
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.lr_at(self.step)
        step_loss = torch.zeros((), dtype=torch.float64, device=self.info.device)
        tokens = 0
        for micro in range(self.accumulation):
            batch, _ = self._micro_batch(self.step, micro)
            sync = micro == self.accumulation - 1
            # Gradients are reduced across ranks only on the last micro-step.
            ctx = contextlib.nullcontext() if sync else D.no_grad_sync(self.wrapped, self.info)
            with ctx:
                with self._autocast():
                    loss, _ = self.wrapped(batch)
                (loss / self.accumulation).backward()
            step_loss += loss.detach().double() / self.accumulation
            tokens += int(batch["attention_mask"].sum())
        grad_norm = (
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            if cfg.grad_clip > 0
            else torch.tensor(float("nan"))
        )
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
            grad_norm = grad_norm.full_tensor()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.position += 1
        local = torch.stack(
            [step_loss, torch.tensor(float(tokens), dtype=torch.float64, device=self.info.device)]
        )
        sums = D.all_reduce_sum(local, self.info)
        return {
            "loss": float(sums[0]) / self.info.world_size,
            "tokens": int(sums[1]),
            "grad_norm": float(grad_norm),
        }

    def _log(self, path: Path, row: dict[str, Any]) -> None:
        if self.info.is_main:
            with open(path, "a") as handle:
                handle.write(json.dumps(row) + "\n")


class PretrainingLoss(torch.nn.Module):
    """Module whose forward is the pretraining loss.

    DDP synchronises gradients only through its wrapped module's ``forward``, so the
    loss (not the hidden states) must be what that forward returns.
    """

    def __init__(self, model: FoundationModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        return self.model.pretraining_loss(batch)


def _truncate_log(path: Path, step: int) -> None:
    # A resumed run repeats the steps after its checkpoint: drop their old log rows.
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [r for r in rows if json.loads(r).get("step", 0) <= step]
    path.write_text("".join(r + "\n" for r in kept))


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))
