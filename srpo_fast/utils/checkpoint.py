"""Resumable training checkpoints: torch DCP for model + optimizer, a small per-rank file for everything else.

Layout of ROOT/step_00000120/:
    dcp/             model and optimizer state, sharded the way FSDP2 holds it (DCP can reshard on load)
    rank_00000.pt    per rank: RNG states (python, numpy, torch, CUDA), LR scheduler, the caller's `extra` dict
    meta.json        step and world size; written last
A checkpoint is built in ROOT/.tmp_step_00000120/ and renamed into place only when every rank has finished, so a
crash or kill mid-save leaves at worst a `.tmp_*` dir that `latest_checkpoint` ignores and the next save deletes.
Every rank must call `save_checkpoint` / `load_checkpoint` (DCP is collective); ROOT must be on a filesystem all
ranks share. Works the same in a plain one-process run, with or without a process group.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from srpo_fast.utils.distributed import barrier, rank, world_size

_STEP_DIR = re.compile(r"^step_(\d{8,})$")
_META = "meta.json"
_FORMAT = 1


def checkpoint_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under root, oldest step first (incomplete or foreign dirs are ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for item in root.iterdir():
        match = _STEP_DIR.match(item.name)
        if match and (item / _META).is_file():
            found.append((int(match.group(1)), item))
    return [path for _, path in sorted(found)]


def latest_checkpoint(root: str | Path) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    checkpoints = list_checkpoints(root)
    return checkpoints[-1] if checkpoints else None


def _rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (kind, keys.tolist(), pos, has_gauss, cached),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _check_loadable(extra: dict[str, Any]) -> None:
    """extra is read back with torch.load(weights_only=True): fail now, not at resume time."""
    buffer = io.BytesIO()
    torch.save(extra, buffer)
    buffer.seek(0)
    try:
        torch.load(buffer, weights_only=True)
    except Exception as err:
        raise TypeError(f"extra must hold only tensors and plain Python data (weights_only-loadable): {err}") from None


@contextlib.contextmanager
def _single_process_quiet():
    """DCP warns on every save/load without a process group; a one-process run is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def _dcp_state(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    state = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optim"] = get_optimizer_state_dict(model, optimizer)
    return state


def _drop_unsaved_optimizer_state(optim_state: dict[str, Any], dcp_dir: Path) -> bool:
    """Parameters that had no gradient yet when the checkpoint was saved have no optimizer state in it; the freshly
    initialised state for them is dropped, so they start from scratch as they would have in the saved run.
    Returns True when nothing had to be dropped."""
    prefix = "optim.state."
    saved = {key[len(prefix):].rsplit(".", 1)[0]  # "optim.state.<fqn>.<field>"
             for key in dcp.FileSystemReader(dcp_dir).read_metadata().state_dict_metadata if key.startswith(prefix)}
    state = optim_state["state"]
    unsaved = [fqn for fqn in state if fqn not in saved]
    for fqn in unsaved:
        del state[fqn]
    return not unsaved


def save_checkpoint(root: str | Path, step: int, *, model: nn.Module,
                    optimizer: torch.optim.Optimizer | None = None, scheduler=None,
                    extra: dict[str, Any] | None = None, keep_last: int | None = 3) -> Path:
    """Save a complete checkpoint for `step`; returns its dir. Collective.

    extra: per-rank data to restore on resume (data-loader position, counters); tensors and plain Python data.
    keep_last: after saving, delete all but the newest keep_last complete checkpoints (None keeps all).
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 or None, got {keep_last}")
    extra = dict(extra or {})
    _check_loadable(extra)
    root = Path(root)
    final = checkpoint_dir(root, step)
    tmp = root / f".tmp_{final.name}"
    if rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp_step_*"):  # left behind by a save that was killed
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    barrier()
    with _single_process_quiet():
        dcp.save(_dcp_state(model, optimizer), checkpoint_id=tmp / "dcp", no_dist=not dist.is_initialized())
    rank_state = {"rng": _rng_state(), "scheduler": scheduler.state_dict() if scheduler is not None else None,
                  "extra": extra}
    torch.save(rank_state, tmp / f"rank_{rank():05d}.pt")
    barrier()
    if rank() == 0:
        meta = tmp / _META
        with open(meta, "w") as f:
            json.dump({"format": _FORMAT, "step": step, "world_size": world_size()}, f)
            f.flush()
            os.fsync(f.fileno())
        old = root / f".old_{final.name}"
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
        if keep_last is not None:
            for path in list_checkpoints(root)[:-keep_last]:
                shutil.rmtree(path, ignore_errors=True)
    barrier()
    return final


def load_checkpoint(path: str | Path, *, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    scheduler=None, restore_rng: bool = True) -> dict[str, Any]:
    """Restore model (+ optimizer, scheduler, this rank's RNG) from a complete checkpoint dir. Collective.

    Build and shard the model and build the optimizer exactly as for the saved run first. Returns
    {"step": int, "extra": this rank's extra dict}. The world size must equal the saved one (RNG states and
    extra are per rank).
    """
    path = Path(path)
    meta_file = path / _META
    if not meta_file.is_file():
        raise FileNotFoundError(f"not a complete checkpoint (no {_META}): {path}")
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != _FORMAT:
        raise ValueError(f"{path}: checkpoint format {meta.get('format')!r}, this code reads {_FORMAT}")
    if meta["world_size"] != world_size():
        raise ValueError(f"{path} was saved by {meta['world_size']} ranks; this run has {world_size()}")
    state = _dcp_state(model, optimizer)
    complete_optim_state = optimizer is None or _drop_unsaved_optimizer_state(state["optim"], path / "dcp")
    with _single_process_quiet():
        dcp.load(state, checkpoint_id=path / "dcp", no_dist=not dist.is_initialized())
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optim"],
                                 options=StateDictOptions(strict=complete_optim_state))
    rank_state = torch.load(path / f"rank_{rank():05d}.pt", weights_only=True)
    if scheduler is not None:
        if rank_state["scheduler"] is None:
            raise ValueError(f"{path} holds no scheduler state, but a scheduler was passed")
        scheduler.load_state_dict(rank_state["scheduler"])
    if restore_rng:
        _set_rng_state(rank_state["rng"])
    barrier()
    return {"step": int(meta["step"]), "extra": rank_state["extra"]}
