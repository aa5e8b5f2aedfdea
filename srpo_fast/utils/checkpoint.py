"""Resumable training checkpoints: torch DCP for model + optimizer, a small per-rank file for everything else.

Layout of ROOT/step_00000120/:
    dcp/             model and optimizer state, sharded the way FSDP2 holds it (DCP can reshard on load)
    rank_00000.pt    per rank: RNG states (python, numpy, torch, CUDA), LR scheduler, the caller's `extra` dict
    meta.json        step and world size; written last
A checkpoint is built in ROOT/.tmp_step_00000120/ and renamed into place only when every rank has finished, so a
crash or kill mid-save leaves at worst a `.tmp_*` dir that `latest_checkpoint` ignores and that `clean_partial`
(at the next start-up, before anything else is written) or the next save deletes. A write that fails (a full disk,
a quota) deletes its partial dir at once and raises `StorageError`: one line naming the path and the free space.
Every rank must call `save_checkpoint` / `load_checkpoint` (DCP is collective); ROOT must be on a filesystem all
ranks share. Works the same in a plain one-process run, with or without a process group.
"""
from __future__ import annotations

import contextlib
import errno
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
from torch.distributed.checkpoint.api import CheckpointException
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from srpo_fast.utils.distributed import all_reduce_dict, barrier, rank, world_size

_STEP_DIR = re.compile(r"^step_(\d{8,})$")
_META = "meta.json"
_FORMAT = 1


class StorageError(OSError):
    """A checkpoint, config or export could not be written (disk full, quota, read-only): the message is one line
    with the path and the free space; the partial files are already gone."""


def _free_space(path: Path) -> str:
    for candidate in (path, *path.parents):
        try:
            usage = shutil.disk_usage(candidate)
        except OSError:
            continue
        return f"{usage.free / 2**20:.1f} MiB free of {usage.total / 2**30:.1f} GiB"
    return "free space unknown"


def storage_error(exc: BaseException, path: str | Path, what: str) -> StorageError:
    """A StorageError for `exc` (found in its cause chain when wrapped, e.g. by DCP) while writing `what` at `path`."""
    path = Path(path)
    found, seen = exc, set()
    while found is not None and not isinstance(found, OSError) and id(found) not in seen:
        seen.add(id(found))
        wrapped = [f[0] if isinstance(f, tuple) else f for f in getattr(found, "failures", {}).values()]
        found = found.__cause__ or found.__context__ or next(
            (e for e in wrapped if isinstance(e, BaseException)), None)
    if isinstance(found, OSError) and found.errno is not None:
        reason = f"{errno.errorcode.get(found.errno, found.errno)} {found.strerror}"
    else:
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
    code = found.errno if isinstance(found, OSError) else None
    return StorageError(code, f"could not write {what} at {path}: {reason} ({_free_space(path)})")


def clean_partial(root: str | Path) -> list[Path]:
    """Start-up clean-up under a checkpoint root, for leftovers of any earlier process: partial `.tmp_step_*`
    dirs are deleted; a `.old_step_*` dir (a save killed between its two renames) is put back when its step has no
    complete checkpoint, else deleted. Returns what was removed. Main rank only; call before writing anything."""
    root = Path(root)
    removed = []
    if not root.is_dir():
        return removed
    for stale in sorted(root.glob(".tmp_step_*")):
        shutil.rmtree(stale, ignore_errors=True)
        removed.append(stale)
    for old in sorted(root.glob(".old_step_*")):
        final = root / old.name[len(".old_"):]
        if (final / _META).is_file() or not (old / _META).is_file():
            shutil.rmtree(old, ignore_errors=True)
            removed.append(old)
        else:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(old, final)
    return removed


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
    error: BaseException | None = None
    if rank() == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            clean_partial(root)  # left behind by a save that was killed
            tmp.mkdir()
        except OSError as exc:
            error = exc
    _raise_if_any_failed(error, tmp, root, step)
    try:
        with _single_process_quiet():
            dcp.save(_dcp_state(model, optimizer), checkpoint_id=tmp / "dcp", no_dist=not dist.is_initialized())
        rank_state = {"rng": _rng_state(), "scheduler": scheduler.state_dict() if scheduler is not None else None,
                      "extra": extra}
        torch.save(rank_state, tmp / f"rank_{rank():05d}.pt")
    except (Exception, CheckpointException) as exc:  # OSError, or DCP's wrapper (a BaseException) around one
        error = exc
    _raise_if_any_failed(error, tmp, root, step)
    if rank() == 0:
        try:
            meta = tmp / _META
            with open(meta, "w") as f:
                json.dump({"format": _FORMAT, "step": step, "world_size": world_size()}, f)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            error = exc
    _raise_if_any_failed(error, tmp, root, step)
    if rank() == 0:
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


def _raise_if_any_failed(error: BaseException | None, tmp: Path, root: Path, step: int) -> None:
    """Collective: when any rank failed to write, every rank raises StorageError (no rank is left waiting in the
    next barrier) after rank 0 deleted the partial checkpoint."""
    failed = error is not None
    if dist.is_initialized():
        failed = all_reduce_dict({"failed": float(failed)}, op="max")["failed"] > 0
    if not failed:
        return
    if rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    if error is None:
        raise StorageError(None, f"checkpoint step {step} under {root}: another rank could not write its part "
                                 f"({_free_space(root)})")
    raise storage_error(error, tmp, f"checkpoint step {step}") from error


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
