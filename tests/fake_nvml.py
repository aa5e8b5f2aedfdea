"""A stand-in for nvidia-ml-py's `pynvml` module on machines without an NVIDIA driver.

Same function names and signatures as the real module (tests/utils/test_telemetry.py checks them against it), the real
module's return structs (c_nvmlUtilization_t, c_nvmlMemory_t), constants and exception classes, and its rules:
every device call before nvmlInit (or after nvmlShutdown) raises NVMLError_Uninitialized; power is in milliwatts.
What it reports is set by the test.
"""
from __future__ import annotations

import types
from collections import Counter

import pynvml


class FakeHandle:
    def __init__(self, index: int):
        self.index = index


class FakeNvml(types.ModuleType):
    NVMLError = pynvml.NVMLError
    NVML_CLOCK_SM = pynvml.NVML_CLOCK_SM
    NVML_ERROR_NOT_SUPPORTED = pynvml.NVML_ERROR_NOT_SUPPORTED
    NVML_ERROR_NO_PERMISSION = pynvml.NVML_ERROR_NO_PERMISSION

    def __init__(self, *, devices: int = 1, util: int = 50, mem_used: int = 10 * 10**9, power_mw: int = 300_000,
                 sm_clock: int = 1980, init_error: int | None = None):
        super().__init__("fake_pynvml")
        self.devices = devices
        self.values = {"util": util, "mem_used": mem_used, "power_mw": power_mw, "sm_clock": sm_clock}
        self.errors: dict[str, int] = {}  # query name -> NVML error code it raises
        self.init_error = init_error
        self.initialized = 0
        self.calls: Counter[str] = Counter()

    def _device_call(self, name: str, handle) -> None:
        self.calls[name] += 1
        if not self.initialized:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_UNINITIALIZED)
        if not isinstance(handle, FakeHandle):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        if name in self.errors:
            raise pynvml.NVMLError(self.errors[name])

    def nvmlInit(self):
        self.calls["nvmlInit"] += 1
        if self.init_error is not None:
            raise pynvml.NVMLError(self.init_error)
        self.initialized += 1

    def nvmlShutdown(self):
        self.calls["nvmlShutdown"] += 1
        if not self.initialized:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_UNINITIALIZED)
        self.initialized -= 1

    def nvmlDeviceGetHandleByIndex(self, index):
        self.calls["nvmlDeviceGetHandleByIndex"] += 1
        if not self.initialized:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_UNINITIALIZED)
        if not 0 <= index < self.devices:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return FakeHandle(index)

    def nvmlDeviceGetHandleByUUID(self, uuid):
        self.calls["nvmlDeviceGetHandleByUUID"] += 1
        raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_FOUND)

    def nvmlDeviceGetUtilizationRates(self, handle):
        self._device_call("nvmlDeviceGetUtilizationRates", handle)
        out = pynvml.c_nvmlUtilization_t()
        out.gpu, out.memory = self.values["util"], self.values["util"] // 2
        return out

    def nvmlDeviceGetMemoryInfo(self, handle, version=None):
        self._device_call("nvmlDeviceGetMemoryInfo", handle)
        out = pynvml.c_nvmlMemory_t()
        out.total, out.used = 141 * 10**9, self.values["mem_used"]
        out.free = out.total - out.used
        return out

    def nvmlDeviceGetPowerUsage(self, handle):
        self._device_call("nvmlDeviceGetPowerUsage", handle)
        return self.values["power_mw"]

    def nvmlDeviceGetClockInfo(self, handle, type):  # noqa: A002 - the real module's parameter name
        self._device_call("nvmlDeviceGetClockInfo", handle)
        if type != pynvml.NVML_CLOCK_SM:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return self.values["sm_clock"]


API = ("nvmlInit", "nvmlShutdown", "nvmlDeviceGetHandleByIndex", "nvmlDeviceGetHandleByUUID",
       "nvmlDeviceGetUtilizationRates", "nvmlDeviceGetMemoryInfo", "nvmlDeviceGetPowerUsage",
       "nvmlDeviceGetClockInfo")
