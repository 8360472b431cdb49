"""Running a training stage on one process or many: process group, model wrapping, batch split, rank 0.

Launched plainly, a stage runs in one process. Launched with torchrun (WORLD_SIZE > 1), every process runs
the same code: `setup` joins the process group (gloo on CPU, NCCL on CUDA), `Runtime.wrap` puts each
trainable model in DDP or FSDP2, and each rank takes its share of every global batch. With the same global
batch, the same per-rank batch and the same seed, a run on N ranks computes what a run on one rank with N
times the gradient accumulation computes (tested on 2 CPU processes).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.nn.parallel import DistributedDataParallel

PARALLEL_MODES = ("ddp", "fsdp")
PRECISIONS = ("fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")

# full, unsharded state dicts on CPU: the checkpoint does not depend on the number of ranks or the wrapper
_SAVE = StateDictOptions(full_state_dict=True, cpu_offload=True)
_LOAD = StateDictOptions(full_state_dict=True)


@dataclass
class ParallelConfig:
    """How a stage uses its processes and its device."""

    parallel: str = "ddp"
    """with several ranks: "ddp" (replicate the trainable models) or "fsdp" (FSDP2 `fully_shard`)"""
    precision: str = "fp32"
    """"bf16": model forwards run under bfloat16 autocast (for GPUs); losses and optimisers stay fp32"""
    activation_checkpointing: bool = False
    """recompute block activations in backward; applies to parallel forwards (cached rollouts keep theirs)"""
    device: str = "auto"
    """"auto" (CUDA when present), "cpu" or "cuda"; each rank takes the GPU of its LOCAL_RANK"""

    def __post_init__(self) -> None:
        for name, allowed in (("parallel", PARALLEL_MODES), ("precision", PRECISIONS), ("device", DEVICES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"parallel.{name}={getattr(self, name)!r}; allowed: {allowed}")


def is_main_process() -> bool:
    """True on rank 0 of a torchrun launch, and in a plain one (read from the environment, no group needed)."""
    return os.environ.get("RANK", "0") == "0"


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DDP wrapper (FSDP2 shards in place, so its model is already the model)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


@dataclass
class Runtime:
    """This process's place in the run: rank, world size, device, and the collectives a stage needs."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    config: ParallelConfig = field(default_factory=ParallelConfig)
    owns_group: bool = False

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes logs, checkpoints and data manifests."""
        return self.rank == 0

    def accumulation(self, global_batch: int, batch_size: int) -> int:
        """Micro-batches per optimiser step: global batch = per-rank batch x world size x accumulation."""
        per_pass = batch_size * self.world_size
        if global_batch < 1 or global_batch % per_pass:
            raise ValueError(
                f"global_batch={global_batch} is not a positive multiple of batch_size={batch_size} x "
                f"world_size={self.world_size} = {per_pass}; use a multiple of {per_pass}"
            )
        return global_batch // per_pass

    def positions(self, step: int, micro: int, batch_size: int, accumulation: int) -> list[int]:
        """Global sample positions of this rank's micro-batch `micro` at `step`.

        Over ranks and micro-batches the positions of a step cover step*G .. step*G + G - 1 exactly once
        (G the global batch), so per-sample data and seeds keyed by position do not depend on the split.
        """
        first = step * batch_size * self.world_size * accumulation
        first += (micro * self.world_size + self.rank) * batch_size
        return list(range(first, first + batch_size))

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """Move a trainable model to the device and spread it over the ranks; returns what to call.

        Keep the model itself for state dicts, EMA and `new_cache` (`unwrap` gives it back).
        """
        model.to(self.device)
        if self.config.activation_checkpointing:
            model.gradient_checkpointing = True
        if self.world_size == 1:
            return model
        if self.config.parallel == "fsdp":
            from torch.distributed.fsdp import fully_shard

            # one FSDP unit for the whole model: the DiT calls its blocks' cross-attention projections from
            # the root forward (the prompt's K/V), which per-block units would leave sharded at that moment
            fully_shard(model)
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    @contextlib.contextmanager
    def grad_sync(self, wrapped: torch.nn.Module, sync: bool) -> Iterator[None]:
        """Reduce gradients over ranks only on the last micro-batch of an accumulation (`sync`)."""
        if isinstance(wrapped, DistributedDataParallel) and not sync:
            with wrapped.no_sync():
                yield
            return
        if hasattr(wrapped, "set_requires_gradient_sync"):  # FSDP2
            wrapped.set_requires_gradient_sync(sync)
        yield

    def autocast(self) -> contextlib.AbstractContextManager:
        """bfloat16 autocast around model forwards when `precision = "bf16"`, else nothing."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.precision == "bf16")

    def mean(self, metrics: dict[str, float]) -> dict[str, float]:
        """Average scalar metrics over ranks (each rank logs its own micro-batches otherwise)."""
        if self.world_size == 1 or not metrics:
            return metrics
        keys = sorted(metrics)
        values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=self._comm)
        dist.all_reduce(values)
        return dict(zip(keys, (values / self.world_size).tolist(), strict=True))

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on any rank (a stop request seen by one process)."""
        if self.world_size == 1:
            return flag
        value = torch.tensor([float(flag)], device=self._comm)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def close(self) -> None:
        """Leave the process group if `setup` created it."""
        if self.owns_group and dist.is_initialized():
            # A gloo worker thread drops its reference to a finished collective (and its tensors) only
            # after the caller's wait returned, and it needs the GIL to do so. If the group's destructor
            # runs first (when the DDP wrappers are freed, holding the GIL), it joins that thread: a
            # deadlock at exit, seen in 1 of 5 two-rank runs. Releasing the GIL a moment lets it finish.
            # The cause is upstream (ProcessGroupGloo's destructor joins its workers without dropping the
            # GIL: pytorch/pytorch#56297, open); remove this wait once torch fixes that.
            time.sleep(0.2)
            dist.destroy_process_group()

    @property
    def _comm(self) -> torch.device:
        # NCCL reduces CUDA tensors only
        return self.device if self.device.type == "cuda" else torch.device("cpu")


def setup(cfg: ParallelConfig) -> Runtime:
    """Join the torchrun process group when WORLD_SIZE > 1 (gloo on CPU, NCCL on CUDA); pick the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise ValueError('parallel.device="cuda" but no CUDA device is visible; use "cpu" or "auto"')
    if world == 1:
        return Runtime(device=torch.device("cuda" if use_cuda else "cpu"), config=cfg)
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    if dist.get_world_size() != world:
        raise ValueError(f"WORLD_SIZE={world} but the process group has {dist.get_world_size()} ranks")
    return Runtime(rank=rank, world_size=world, device=device, config=cfg, owns_group=owns)


class ModelState:
    """A model's full state dict on CPU, whether it is plain, in DDP or sharded by FSDP2 (for run_loop)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = unwrap(model)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return get_model_state_dict(self.model, options=_SAVE)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        set_model_state_dict(self.model, state, options=_LOAD)


class OptimizerState:
    """An optimiser's full state keyed by parameter name, the same for any wrapper or number of ranks."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model = unwrap(model)
        self.optimizer = optimizer

    def state_dict(self) -> dict:
        return get_optimizer_state_dict(self.model, self.optimizer, options=_SAVE)

    def load_state_dict(self, state: dict) -> None:
        set_optimizer_state_dict(self.model, self.optimizer, state, options=_LOAD)


def clip_grad_norm(model: torch.nn.Module, max_norm: float) -> float:
    """Clip the global gradient norm (over every rank's shards with FSDP2) and return it before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)
