"""Per-step metrics: a jsonl file always (survives crashes line by line), TensorBoard / wandb when asked for.

The jsonl is the source of truth: `python -m srpo_fast.utils.plot RUN/metrics.jsonl` turns it into curves, and a
resumed run appends to the same file, dropping lines from steps it is about to redo so no step appears twice.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import time
from pathlib import Path
from typing import Any
from collections.abc import Mapping, Sequence

import torch

from srpo_fast.utils.distributed import all_reduce_dict


def _plain(value: Any) -> Any:
    """JSON-friendly scalar: 0-d tensors become floats, NaN/inf become strings JSON can hold."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"metric tensors must hold one value, got shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool):
        return value
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsLogger:
    """Append-only metrics sink. Only the main rank should construct one (others pass enabled=False)."""

    def __init__(self, run_dir: str | Path, *, tensorboard: str = "auto", wandb_project: str | None = None,
                 enabled: bool = True, resume_from_step: int | None = None, config: Mapping | None = None):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            self._rewrite_kept(resume_from_step)
        if tensorboard == "on" or (tensorboard == "auto" and importlib.util.find_spec("tensorboard")):
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.path.parent / "tensorboard"))
        if wandb_project:
            if not os.environ.get("WANDB_API_KEY"):
                raise RuntimeError("log.wandb_project is set but WANDB_API_KEY is not in the environment")
            import wandb

            self._wandb = wandb.init(project=wandb_project, dir=str(self.path.parent), config=dict(config or {}))
        self._file = self.path.open("a", encoding="utf-8")

    def _rewrite_kept(self, resume_from_step: int | None) -> None:
        """Drop a torn last line (a crash mid-write) and, on resume, the steps after the checkpoint that will be
        redone; rewritten atomically so the file is never half-written."""
        rows = read_metrics(self.path)
        if resume_from_step is not None:
            rows = [row for row in rows if row.get("step", -1) <= resume_from_step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
        tmp.replace(self.path)

    def log(self, step: int, metrics: Mapping[str, Any]) -> dict:
        """Write one line {"step", "time", **metrics}; returns the plain dict written."""
        row = {"step": int(step), "time": round(time.time(), 3)}
        row.update({k: _plain(v) for k, v in metrics.items()})
        if not self.enabled:
            return row
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        for key, value in row.items():
            if key in ("step", "time") or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            if self._tb is not None:
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in row.items() if k != "step"}, step=step)
        return row

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(path: str | Path) -> list[dict]:
    """All rows of a metrics.jsonl; a torn last line (a crash mid-write) is ignored, any other bad line raises."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}:{i + 1}: not a JSON line") from None
    return rows


class MetricSums:
    """Weighted sums of per-micro-batch metric means, kept as tensors where they are computed: nothing waits for
    the device until `reduce`, which syncs once and then reduces over ranks in one collective per kind."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.maxima: dict[str, torch.Tensor] = {}
        self.weight: torch.Tensor | float = 0.0

    def add(self, metrics: dict[str, torch.Tensor], weight: torch.Tensor | float, max_keys: tuple[str, ...] = (),
            sum_keys: tuple[str, ...] = ()) -> None:
        """metrics: 0-d tensors (or floats); `sum_keys` are summed as they are, the rest weighted by `weight`."""
        self.weight = self.weight + weight
        for key, value in metrics.items():
            value = torch.as_tensor(value).detach().double()
            if key in max_keys:
                self.maxima[key] = value if key not in self.maxima else torch.maximum(self.maxima[key], value)
            else:
                term = value if key in sum_keys else value * weight
                self.sums[key] = term if key not in self.sums else self.sums[key] + term

    def reduce(self, keys: Sequence[str], max_keys: Sequence[str] = (),
               sum_keys: Sequence[str] = ()) -> dict[str, float]:
        """Global weighted means of `keys`, plain sums of `sum_keys` and maxima of `max_keys` (every rank passes
        the same keys; a rank that saw none contributes 0, or -inf to a maximum)."""
        local = {"__weight": self.weight, **{k: self.sums.get(k, 0.0) for k in (*keys, *sum_keys)}}
        sums = all_reduce_dict(_host(local), op="sum")
        maxima = all_reduce_dict(_host({k: self.maxima.get(k, -math.inf) for k in max_keys}), op="max")
        weight = sums.pop("__weight")
        out = {k: (v / weight if weight else 0.0) for k, v in sums.items() if k not in sum_keys}
        out.update({k: sums[k] for k in sum_keys})
        out.update({k: (v if math.isfinite(v) else 0.0) for k, v in maxima.items()})
        return out


def _host(values: dict[str, torch.Tensor | float]) -> dict[str, float]:
    """One device sync for all the tensors of `values`."""
    tensors = {k: v for k, v in values.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        return {k: float(v) for k, v in values.items()}
    device = next(iter(tensors.values())).device
    flat = torch.stack([v.reshape(()).double().to(device) for v in tensors.values()]).tolist()
    out = {k: float(v) for k, v in values.items() if k not in tensors}
    out.update(zip(tensors, flat))
    return out
