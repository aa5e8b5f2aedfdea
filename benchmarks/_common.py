"""Shared helpers for the benchmark scripts: timing, peak memory, results JSON, optional plots.

Timing uses CUDA events on GPU (so host overhead between launches does not count twice) and perf_counter on
CPU. Peak memory on GPU is the allocator's peak above what was allocated before the call; on CPU it is the peak
of live bytes from the profiler's allocation events (the only view of torch's CPU allocations).

On CUDA with NVML (nvidia-ml-py), GPU telemetry rides along: `timeit` adds a "gpu" entry (mean utilization, device
memory, power, SM clock over its timed iterations), and every results file gets "gpu_telemetry", the means over the
whole script from its first use of this module. Absent on CPU or without NVML.
"""
from __future__ import annotations

import gc
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from srpo_fast.utils.telemetry import gpu_sampler

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "benchmarks" / "results"


_SCRIPT_PHASE = "script"  # the telemetry phase that spans the whole benchmark script
_TIMED_PHASE = "timed"


_TELEMETRY: list = []  # [sampler or None], opened once per process


def telemetry():
    """This process's GPU sampler with the whole-script phase open (None on CPU or without NVML)."""
    if not _TELEMETRY:
        sampler = gpu_sampler()
        if sampler is not None:
            sampler.begin(_SCRIPT_PHASE)
        _TELEMETRY.append(sampler)
    return _TELEMETRY[0]


telemetry()  # start sampling when a script imports the helpers, so gpu_telemetry covers the whole run


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn: Callable[[Any], Any], *, device: torch.device, setup: Callable[[], Any] | None = None,
           warmup: int = 2, iters: int = 5, clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Time ``fn(setup())`` (only ``fn`` is timed); returns median/min/mean milliseconds over ``iters`` runs.
    clock (CPU only): time.process_time measures the work done, not the share of a busy machine it got."""
    for _ in range(warmup):
        fn(setup() if setup else None)
    sync(device)
    sampler = telemetry() if device.type == "cuda" else None
    if sampler is not None:
        sampler.begin(_TIMED_PHASE)
    times = []
    for _ in range(iters):
        arg = setup() if setup else None
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            sync(device)
            start.record()
            fn(arg)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = clock()
            fn(arg)
            times.append((clock() - t0) * 1e3)
    out = {"median_ms": statistics.median(times), "min_ms": min(times), "mean_ms": statistics.fmean(times)}
    if sampler is not None:
        sampler.end(_TIMED_PHASE)
        out["gpu"] = sampler.take(_TIMED_PHASE).get(_TIMED_PHASE, {})
    return out


def _cpu_peak_bytes(fn: Callable[[], Any]) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def peak_memory_bytes(fn: Callable[[], Any], *, device: torch.device) -> int:
    """Peak bytes allocated by ``fn()`` above what was live before it (results it keeps alive included)."""
    gc.collect()
    if device.type != "cuda":
        return _cpu_peak_bytes(fn)
    torch.cuda.empty_cache()
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated(device) - before


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def environment() -> dict[str, Any]:
    info: dict[str, Any] = {"python": sys.version.split()[0], "torch": torch.__version__,
                            "platform": platform.platform(), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, device_memory_GiB=round(props.total_memory / 2**30, 1),
                    sms=props.multi_processor_count)
    else:
        info["device"] = "cpu"
    return info


def write_results(name: str, data: dict[str, Any], out: str | Path | None = None) -> Path:
    """Write ``data`` (plus the environment) to ``out`` or benchmarks/results/NAME.json; returns the path."""
    path = Path(out) if out is not None else RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "environment": environment(), **data}
    sampler = telemetry()
    if sampler is not None:
        payload["gpu_telemetry"] = sampler.means(_SCRIPT_PHASE)
    path.write_text(json.dumps(payload, indent=2, sort_keys=False, default=float) + "\n")
    return path


def plot_bars(path: str | Path, panels: list[tuple[str, str, dict[str, dict[str, float]]]]) -> Path | None:
    """Grouped bar charts, one panel per (title, y label, {group: {series: value}}); None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(len(panels), 1, figsize=(12, 4 * len(panels)), squeeze=False)
    for ax, (title, ylabel, groups) in zip(axes[:, 0], panels):
        series = sorted({s for values in groups.values() for s in values})
        width = 0.8 / max(1, len(series))
        for i, name in enumerate(series):
            xs = [g + i * width for g in range(len(groups))]
            ax.bar(xs, [values.get(name, 0.0) for values in groups.values()], width, label=name)
        ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], list(groups), rotation=20, fontsize=8)
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        if series:
            ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
