"""GPU telemetry per phase of a step, read from NVML (nvidia-ml-py) by a background thread.

The thread reads utilization, device memory used (NVML's view: every process and allocator on the GPU, not only
torch's), power draw and SM clock at a fixed interval. The step's phases (`PhaseTimer`) tell it which phase is
running; each phase's samples average into `gpu/<field>_<phase>` metrics (gpu/util_rollout, gpu/mem_gb_train, ...).
NVML never touches a CUDA stream, so sampling adds no host sync to training.

Without NVML (a CPU run, the package missing, no driver) there is no sampler and no gpu/ metric: never an error.
A field that this GPU does not report (NVML says "not supported") is dropped, the others stay. The values are this
process's GPU only; the trainer logs rank 0's.
"""
from __future__ import annotations

import atexit
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch

from srpo_fast.utils.distributed import default_device

FIELDS = ("util", "mem_gb", "power_w", "sm_clock_mhz")  # metric name = f"gpu/{field}_{phase}"
DEFAULT_INTERVAL_S = 0.1


def _readers(nvml) -> dict[str, Callable[[Any], float]]:
    return {
        "util": lambda h: float(nvml.nvmlDeviceGetUtilizationRates(h).gpu),  # % of time a kernel ran
        "mem_gb": lambda h: nvml.nvmlDeviceGetMemoryInfo(h).used / 1e9,
        "power_w": lambda h: nvml.nvmlDeviceGetPowerUsage(h) / 1e3,  # NVML reports milliwatts
        "sm_clock_mhz": lambda h: float(nvml.nvmlDeviceGetClockInfo(h, nvml.NVML_CLOCK_SM)),
    }


class GpuSampler:
    """Samples one GPU every `interval_s` in a daemon thread; a sample counts for every phase open at that moment.

    Phases are opened and closed by the training thread (`phase(name)`, or `begin`/`end`); `take()` returns each
    phase's means and forgets them. A phase that ended before the thread sampled it gets one sample at its end, so
    every phase that ran reports values.
    """

    def __init__(self, nvml, handle, *, interval_s: float = DEFAULT_INTERVAL_S,
                 on_close: Callable[[], None] | None = None):
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self._nvml, self._handle, self.interval_s = nvml, handle, interval_s
        self._readers = _readers(nvml)
        self._lock = threading.Lock()
        self._open: list[str] = []
        self._sums: dict[str, dict[str, float]] = {}
        self._counts: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="srpo-gpu-telemetry", daemon=True)
        self._on_close = on_close
        self.sample()  # drops the fields this GPU does not report before the thread starts

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(self._readers)

    def sample(self) -> dict[str, float]:
        """One reading of every field this GPU reports. A field NVML calls unsupported (or forbidden) is dropped
        for good; any other NVML error only skips that field in this reading."""
        nvml = self._nvml
        refused = (nvml.NVML_ERROR_NOT_SUPPORTED, nvml.NVML_ERROR_NO_PERMISSION)
        out = {}
        for field, read in list(self._readers.items()):
            try:
                out[field] = read(self._handle)
            except nvml.NVMLError as exc:
                if getattr(exc, "value", None) in refused:
                    self._readers.pop(field, None)
        return out

    def start(self) -> GpuSampler:
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop the thread (waits at most one interval) and release NVML."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        if self._on_close is not None:
            on_close, self._on_close = self._on_close, None
            on_close()

    def _record(self, phases: list[str], values: dict[str, float]) -> None:
        for phase in phases:
            sums = self._sums.setdefault(phase, {})
            for field, value in values.items():
                sums[field] = sums.get(field, 0.0) + value
            self._counts[phase] = self._counts.get(phase, 0) + 1

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            with self._lock:
                phases = list(self._open)
            if not phases:
                continue
            try:
                values = self.sample()
            except Exception as exc:  # noqa: BLE001 - telemetry must never take the run down
                print(f"[telemetry] GPU sampling stopped: {type(exc).__name__}: {exc}")
                return
            with self._lock:
                self._record([p for p in phases if p in self._open], values)

    def begin(self, name: str) -> None:
        with self._lock:
            self._open.append(name)
            self._counts.setdefault(name, 0)

    def end(self, name: str) -> None:
        with self._lock:
            if name in self._open:
                self._open.remove(name)
            sampled = self._counts.get(name, 0) > 0
        if not sampled:
            values = self.sample()
            with self._lock:
                self._record([name], values)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.begin(name)
        try:
            yield
        finally:
            self.end(name)

    def means(self, name: str) -> dict[str, float]:
        """{field: mean, ..., "samples": n} of one phase so far (empty when it has no sample)."""
        with self._lock:
            count = self._counts.get(name, 0)
            if not count:
                return {}
            averages = {f: v / count for f, v in self._sums.get(name, {}).items()}
        return {**averages, "samples": float(count)}

    def take(self, name: str | None = None) -> dict[str, dict[str, float]]:
        """Means of the closed phases (or only `name`), forgotten afterwards; open phases keep accumulating."""
        with self._lock:
            names = [n for n in self._counts if n not in self._open and (name is None or n == name)]
        out = {n: m for n in names if (m := self.means(n))}
        with self._lock:
            for n in names:
                self._sums.pop(n, None)
                self._counts.pop(n, None)
        return out


def phase_metrics(taken: dict[str, dict[str, float]]) -> dict[str, float]:
    """{phase: {field: mean}} → flat metrics gpu/<field>_<phase> (sample counts left out)."""
    return {f"gpu/{field}_{phase}": value for phase, means in taken.items()
            for field, value in means.items() if field in FIELDS}


def _nvml_handle(nvml, cuda_index: int):
    """NVML's handle for torch's CUDA device `cuda_index`: by UUID where torch reports one (NVML and CUDA may
    number devices differently), else through CUDA_VISIBLE_DEVICES' numeric list, else the same index."""
    uuid = getattr(torch.cuda.get_device_properties(cuda_index), "uuid", None) if torch.cuda.is_available() else None
    if uuid is not None:
        try:
            return nvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
        except nvml.NVMLError:
            pass
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if cuda_index < len(visible) and visible[cuda_index].isdigit():
        return nvml.nvmlDeviceGetHandleByIndex(int(visible[cuda_index]))
    return nvml.nvmlDeviceGetHandleByIndex(cuda_index)


def open_sampler(cuda_index: int = 0, *, nvml=None, interval_s: float = DEFAULT_INTERVAL_S) -> GpuSampler | None:
    """A started sampler for one GPU, or None when NVML is not there (package missing, no driver, no such GPU, or
    a GPU that reports none of the fields). `nvml` defaults to the `pynvml` module of nvidia-ml-py."""
    if nvml is None:
        try:
            import pynvml as nvml
        except ImportError:
            return None
    try:
        nvml.nvmlInit()
    except (nvml.NVMLError, OSError):
        return None
    try:
        sampler = GpuSampler(nvml, _nvml_handle(nvml, cuda_index), interval_s=interval_s, on_close=nvml.nvmlShutdown)
    except nvml.NVMLError:
        nvml.nvmlShutdown()
        return None
    if not sampler.fields:
        sampler.close()
        return None
    return sampler.start()


_PROCESS_SAMPLERS: dict[int, GpuSampler | None] = {}


def gpu_sampler(device: torch.device | str | None = None) -> GpuSampler | None:
    """The process's sampler for a CUDA device (default: this rank's, cuda:LOCAL_RANK), started on first use and
    closed at exit; None on CPU or without NVML."""
    if not torch.cuda.is_available():
        return None
    device = torch.device(device) if device is not None else default_device()
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _PROCESS_SAMPLERS:
        sampler = _PROCESS_SAMPLERS[index] = open_sampler(index)
        if sampler is not None:
            atexit.register(sampler.close)
    return _PROCESS_SAMPLERS[index]


class PhaseTimer:
    """Wall time per named phase of one step and, given a sampler, the GPU's mean state during each phase."""

    def __init__(self, gpu: GpuSampler | None = None):
        self.seconds: dict[str, float] = {}
        self.gpu = gpu

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            with self.gpu.phase(name) if self.gpu is not None else nullcontext():
                yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def gpu_metrics(self) -> dict[str, float]:
        """gpu/<field>_<phase> for the phases timed so far (empty without a sampler); each is reported once."""
        return phase_metrics(self.gpu.take()) if self.gpu is not None else {}
