"""Process-group set-up, model wrapping and full state dicts, applied from outside the model.

A single process when ``WORLD_SIZE`` is unset; under ``torchrun`` the rank and world size
come from the environment, with gloo on CPU and NCCL on GPU. Two data-parallel strategies,
both PyTorch's own:

- ``"ddp"``: :class:`~torch.nn.parallel.DistributedDataParallel`, a full replica per rank.
- ``"fsdp"``: FSDP2 (:func:`torch.distributed.fsdp.fully_shard`) on every transformer
  block and on the model root, so parameters, gradients and optimizer state are sharded.

Whatever the strategy, checkpoints hold *full* (unsharded) tensors keyed by parameter
name, gathered with :mod:`torch.distributed.checkpoint.state_dict`; a checkpoint from a
sharded run therefore loads into one process or into any other number of processes.
"""

from __future__ import annotations

import contextlib
import gc
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

STRATEGIES = ("ddp", "fsdp")


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")  # noqa: RUF009 (immutable)

    @property
    def is_main(self) -> bool:
        """Only the main process writes logs, checkpoints and the model folder."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether more than one process takes part."""
        return self.world_size > 1


def init_distributed(device: str | None = None) -> DistInfo:
    """Read torchrun's environment and start the process group if needed.

    Parameters
    ----------
    device
        "cpu", "cuda" or None (CUDA when available).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda"
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def _is_fsdp(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def shard_model(
    model: nn.Module, info: DistInfo, forward_methods: tuple[str, ...] = ("pretraining_loss",)
) -> None:
    """Apply FSDP2 in place: one unit per transformer block, the task head, then the root.

    The root unit holds what is left (token embedding, final norm, pretraining head). Its
    all-gather is hooked on ``forward`` and on ``forward_methods`` too, since training
    calls those, not ``forward``: pretraining ``pretraining_loss``; fine-tuning
    ``forward_batch``, after which it applies the task head, hence the head's own unit.
    """
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    blocks = getattr(getattr(model, "backbone", None), "blocks", None)
    for block in blocks if blocks is not None else []:
        fully_shard(block)
    if getattr(model, "task_head", None) is not None:
        fully_shard(model.task_head)
    fully_shard(model)
    for name in forward_methods:
        if hasattr(model, name):
            register_fsdp_forward_method(model, name)


def wrap_model(model: nn.Module, info: DistInfo, strategy: str = "ddp") -> nn.Module:
    """Wrap ``model`` for data-parallel training (a no-op in a single process).

    Parameters
    ----------
    model
        The module whose ``forward`` computes the loss (the trainer passes a thin wrapper
        around the :class:`~healthfm.model.heads.FoundationModel`, listing the inner
        model's methods it calls in ``fsdp_methods``).
    info
        Process placement.
    strategy
        "ddp" or "fsdp". For "fsdp" the *inner* model (``model.model`` when present) is
        sharded in place, so its parameter names stay those of the bare model.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {STRATEGIES}")
    if not info.distributed:
        return model
    if strategy == "ddp":
        ids = [info.local_rank] if info.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)
    methods = getattr(model, "fsdp_methods", ("pretraining_loss",))
    shard_model(getattr(model, "model", model), info, methods)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside a DDP wrapper."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


@contextlib.contextmanager
def no_grad_sync(wrapped: nn.Module, info: DistInfo) -> Iterator[None]:
    """Skip the gradient all-reduce / reduce-scatter (accumulation micro-steps).

    DDP: ``no_sync()``; FSDP2: ``set_requires_gradient_sync(False)`` on the sharded units.
    """
    if not info.distributed:
        yield
        return
    if isinstance(wrapped, nn.parallel.DistributedDataParallel):
        with wrapped.no_sync():
            yield
        return
    units = [m for m in wrapped.modules() if _is_fsdp(m)]
    for unit in units:
        unit.set_requires_gradient_sync(False, recurse=False)
    try:
        yield
    finally:
        for unit in units:
            unit.set_requires_gradient_sync(True, recurse=False)


def is_sharded(model: nn.Module) -> bool:
    """Whether FSDP has been applied to ``model`` (or any of its sub-modules)."""
    return any(_is_fsdp(m) for m in model.modules())


def _dcp():
    # torch.distributed.checkpoint takes a second to import: only when states move.
    from torch.distributed.checkpoint import state_dict

    return state_dict


def _options(load: bool):
    dcp = _dcp()
    if load:
        return dcp.StateDictOptions(full_state_dict=True, strict=True)
    return dcp.StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(model: nn.Module, info: DistInfo) -> dict[str, torch.Tensor]:
    """Full, unsharded CPU weights keyed by parameter name.

    Collective under FSDP (every rank must call it); only the main rank gets the tensors,
    the others an empty dict.
    """
    if not is_sharded(model):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    state = _dcp().get_model_state_dict(model, options=_options(load=False))
    return state if info.is_main else {}


def full_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, info: DistInfo
) -> dict[str, Any]:
    """Full optimizer state keyed by parameter *name* (not position), any strategy.

    Keys by name make the state independent of sharding and process count. Collective
    under FSDP; only the main rank gets the state.
    """
    state = _dcp().get_optimizer_state_dict(model, optimizer, options=_options(load=False))
    return state if info.is_main or not is_sharded(model) else {}


def load_full_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any] | None,
    may_lack: tuple[str, ...] | list[str] = (),
) -> None:
    """Load full (unsharded) states into a plain, DDP or FSDP model and its optimizer.

    Every rank passes the full states; under FSDP each keeps its shard. Missing or
    unexpected names are an error (``KeyError``), never a partial load, except the names
    in ``may_lack`` (frozen weights a checkpoint leaves out), which keep their values.
    """
    # Check everything before touching anything: a mismatch must not leave a half-load.
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}  # global shapes under FSDP
    missing, unexpected = (
        sorted(set(shapes) - set(model_state) - set(may_lack)),
        sorted(set(model_state) - set(shapes)),
    )
    if missing or unexpected:
        raise KeyError(f"missing weights {missing[:5]}, unexpected weights {unexpected[:5]}")
    wrong = [
        f"{k} {tuple(v.shape)} vs {shapes[k]}"
        for k, v in model_state.items()
        if tuple(v.shape) != shapes[k]
    ]
    if wrong:
        raise ValueError(f"weight shapes differ (checkpoint vs model): {wrong[:3]}")
    if optimizer is not None and optimizer_state is not None:
        params = {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}
        saved = optimizer_state.get("state", {})
        if not set(saved) <= set(params):
            raise KeyError(
                f"optimizer state for unknown parameters {sorted(set(saved) - set(params))[:5]}"
            )
        for name, slots in saved.items():
            for slot, value in slots.items():
                if torch.is_tensor(value) and value.ndim and tuple(value.shape) != params[name]:
                    raise ValueError(
                        f"optimizer state {name}.{slot} has shape {tuple(value.shape)}, "
                        f"the parameter {params[name]}"
                    )
    options = _options(load=True)
    if set(shapes) - set(model_state):
        options = _dcp().StateDictOptions(full_state_dict=True, strict=False)
    _dcp().set_model_state_dict(model, model_state, options=options)
    if optimizer is not None and optimizer_state is not None:
        _dcp().set_optimizer_state_dict(
            model, optimizer, optimizer_state, options=_options(load=True)
        )


def full_tensor(value: torch.Tensor) -> torch.Tensor:
    """The whole tensor on CPU (collective for a sharded DTensor: every rank calls it)."""
    if hasattr(value, "full_tensor"):
        value = value.full_tensor()
    return value.detach().cpu()


def like(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A full tensor placed as ``param`` is: its shard under FSDP, else on its device."""
    if hasattr(param, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full.to(param.device), param.device_mesh, param.placements)
    return full.to(device=param.device, dtype=param.dtype)


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's ``obj``, in rank order (a one-element list in a single process)."""
    if not info.distributed:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def all_reduce_mean(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Average a tensor over ranks (identity in a single process)."""
    if info.distributed:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= info.world_size
    return value


def all_reduce_sum(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum a tensor over ranks (identity in a single process)."""
    if info.distributed:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def barrier(info: DistInfo) -> None:
    """Wait for every rank."""
    if info.distributed:
        dist.barrier()


def shutdown(info: DistInfo | None = None, barrier: bool = True) -> None:
    """Tear the process group down and free it while the interpreter is alive.

    Call it once the trainer and any DDP/FSDP module are out of scope. Gloo's worker
    threads drop finished work (which holds Python-owned tensors) after the caller has
    already moved on; if the process group outlives ``main`` and is only freed during
    interpreter shutdown, a worker thread can still be dropping such a tensor then, and
    the process aborts ("terminate called without an active exception", seen in about
    1 run in 20 of two DDP processes). Freeing the group here runs its destructor, which
    drains the queue and joins those threads first.

    Parameters
    ----------
    info
        The run's process layout; None tears down whatever group this process started.
    barrier
        Wait for every rank first (a normal end). False on an error exit, where the other
        ranks may never arrive.
    """
    if (info is None or info.distributed) and dist.is_available() and dist.is_initialized():
        if barrier:
            dist.barrier()
        # Free what cycles still hold (a trainer's DDP reducer, generator frames) while the
        # group is alive, so that destroying it drops the last reference and joins gloo's
        # threads now rather than at some later collection.
        gc.collect()
        dist.destroy_process_group()
        # FSDP2's device mesh keeps its process groups in a registry, and DTensor's
        # sharding caches keep the mesh alive; release the groups from every mesh.
        from torch.distributed.device_mesh import DeviceMesh

        with warnings.catch_warnings():  # isinstance() on torch's deprecated reduce_op warns
            warnings.simplefilter("ignore", FutureWarning)
            for obj in gc.get_objects():
                try:
                    is_mesh = isinstance(obj, DeviceMesh)
                except ReferenceError:  # a dead weakref.proxy
                    continue
                if is_mesh and isinstance(getattr(obj, "_pg_registry", None), dict):
                    obj._pg_registry.clear()
    gc.collect()
