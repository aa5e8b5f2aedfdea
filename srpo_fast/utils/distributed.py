"""Process-group helpers: one code path for torchrun (any world size) and a plain `python` run (world 1).

A plain run still gets a real one-rank process group (in-memory store, no ports), so FSDP2, DTensor and DCP run
the same code as under torchrun. On CUDA the group has two backends, NCCL for CUDA tensors and gloo for CPU
tensors (CPU-offloaded parameters, DCP's small object collectives); on CPU it is gloo alone.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal
from collections.abc import Mapping

import numpy as np
import torch
import torch.distributed as dist

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in _TORCHRUN_VARS)


def init_distributed(backend: str | None = None, timeout_s: float = 1800.0) -> DistInfo:
    """Initialise the default process group once (later calls return the same info).

    backend: None picks "cuda:nccl,cpu:gloo" when CUDA is available, else "gloo".
    """
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
    if not dist.is_initialized():
        if backend is None:
            backend = "cuda:nccl,cpu:gloo" if torch.cuda.is_available() else "gloo"
        timeout = timedelta(seconds=timeout_s)
        if launched_by_torchrun():
            dist.init_process_group(backend=backend, init_method="env://", timeout=timeout)
        else:
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    return DistInfo(rank=rank(), world_size=world_size(), local_rank=local_rank(), device=default_device())


def default_device() -> torch.device:
    return torch.device("cuda", local_rank()) if torch.cuda.is_available() else torch.device("cpu")


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    """A no-op without a process group; on NCCL it names the device so the barrier cannot pick the wrong GPU."""
    if not dist.is_initialized():
        return
    if torch.cuda.is_available() and "nccl" in str(dist.get_backend()):
        dist.barrier(device_ids=[local_rank()])
    else:
        dist.barrier()


def all_reduce_dict(values: Mapping[str, float | int | torch.Tensor],
                    op: Literal["mean", "sum", "max", "min"] = "mean") -> dict[str, float]:
    """Reduce a dict of scalars over all ranks in ONE collective; returns plain floats (same keys on every rank).

    Every rank must pass the same keys; they are reduced in sorted-key order so insertion order does not matter.
    """
    if op not in ("mean", *_REDUCE_OPS):
        raise ValueError(f"op must be one of mean, sum, max, min; got {op!r}")
    keys = sorted(values)
    if not keys:
        return {}
    scalars = []
    for key in keys:
        value = values[key]
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise ValueError(f"values[{key!r}] must hold one element, got shape {tuple(value.shape)}")
            value = value.detach().to(torch.float64).reshape(())
        scalars.append(torch.as_tensor(value, dtype=torch.float64))
    packed = torch.stack([s.cpu() for s in scalars])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(packed, op=_REDUCE_OPS.get(op, dist.ReduceOp.SUM))
        if op == "mean":
            packed /= dist.get_world_size()
    return dict(zip(keys, packed.tolist()))


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (out of place); e.g. the global token count that normalises a token-mean loss."""
    out = tensor.detach().clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def seed_everything(seed: int, rank_offset: int = 0) -> None:
    """Seed python, numpy and torch (all devices) with seed + rank_offset.

    Pass the rank as rank_offset where ranks must draw different numbers (sampling, dropout); pass 0 where they
    must agree (model init before sharding, data shuffling shared by all ranks).
    """
    if seed < 0 or rank_offset < 0:
        raise ValueError(f"seed and rank_offset must be >= 0, got seed={seed}, rank_offset={rank_offset}")
    value = seed + rank_offset
    random.seed(value)
    np.random.seed(value % 2**32)
    torch.manual_seed(value)  # also seeds every CUDA device


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
