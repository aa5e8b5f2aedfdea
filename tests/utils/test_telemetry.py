"""GPU telemetry (srpo_fast/utils/telemetry.py): per-phase means from a sampler thread, driven by a fake NVML module
that has the real pynvml's shape; and absent, without an error, wherever NVML is not there."""
from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from srpo_fast.utils import telemetry
from srpo_fast.utils.plot import panel_and_line, plot_metrics
from srpo_fast.utils.telemetry import GpuSampler, PhaseTimer, open_sampler, phase_metrics

pynvml = pytest.importorskip("pynvml")  # nvidia-ml-py: the fake below takes its structs, constants and errors

from fake_nvml import API, FakeNvml  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent.parent
TESTS = Path(__file__).resolve().parent.parent


def wait_for(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the sampler thread"
        time.sleep(0.005)


@pytest.fixture
def fake():
    nvml = FakeNvml()
    nvml.nvmlInit()
    return nvml


def test_fake_nvml_has_the_real_modules_api():
    nvml = FakeNvml()
    for name in API:
        real, ours = getattr(pynvml, name), getattr(nvml, name)
        assert list(inspect.signature(ours).parameters) == list(inspect.signature(real).parameters), name
    assert nvml.NVMLError is pynvml.NVMLError and nvml.NVML_CLOCK_SM == pynvml.NVML_CLOCK_SM
    with pytest.raises(pynvml.NVMLError_Uninitialized):  # the real rule: no device call before nvmlInit
        nvml.nvmlDeviceGetHandleByIndex(0)


def test_samples_average_per_phase_and_convert_units(fake):
    sampler = GpuSampler(fake, fake.nvmlDeviceGetHandleByIndex(0), interval_s=0.005).start()
    timer = PhaseTimer(sampler)
    try:
        for phase, util, mem, power_mw in (("rollout", 90, 30 * 10**9, 650_000), ("train", 20, 70 * 10**9, 400_000)):
            fake.values.update(util=util, mem_used=mem, power_mw=power_mw)
            with timer(phase):
                before = fake.calls["nvmlDeviceGetUtilizationRates"]
                wait_for(lambda: fake.calls["nvmlDeviceGetUtilizationRates"] >= before + 3)  # the thread samples
        metrics = timer.gpu_metrics()
    finally:
        sampler.close()
    assert metrics == {"gpu/util_rollout": 90.0, "gpu/mem_gb_rollout": 30.0, "gpu/power_w_rollout": 650.0,
                       "gpu/sm_clock_mhz_rollout": 1980.0, "gpu/util_train": 20.0, "gpu/mem_gb_train": 70.0,
                       "gpu/power_w_train": 400.0, "gpu/sm_clock_mhz_train": 1980.0}
    assert set(timer.seconds) == {"rollout", "train"}
    assert timer.gpu_metrics() == {}  # each phase is reported once


def test_a_mean_over_changing_readings_and_nothing_sampled_outside_phases(fake):
    sampler = GpuSampler(fake, fake.nvmlDeviceGetHandleByIndex(0), interval_s=0.005).start()
    try:
        idle_calls = fake.calls["nvmlDeviceGetPowerUsage"]
        time.sleep(0.05)
        assert fake.calls["nvmlDeviceGetPowerUsage"] == idle_calls  # no phase open: the thread does not query
        with sampler.phase("sync"):
            for watts in (100, 300):
                fake.values["power_mw"] = watts * 1000
                seen = fake.calls["nvmlDeviceGetPowerUsage"]
                wait_for(lambda: fake.calls["nvmlDeviceGetPowerUsage"] >= seen + 5)
        means = sampler.take()["sync"]
    finally:
        sampler.close()
    assert 100.0 < means["power_w"] < 300.0 and means["samples"] >= 10


def test_a_phase_shorter_than_the_interval_still_gets_one_sample(fake):
    sampler = GpuSampler(fake, fake.nvmlDeviceGetHandleByIndex(0), interval_s=60.0).start()
    timer = PhaseTimer(sampler)
    try:
        with timer("reward"):
            pass
        assert sampler.means("reward")["samples"] == 1.0
        assert timer.gpu_metrics()["gpu/util_reward"] == 50.0
    finally:
        sampler.close()
    assert fake.initialized == 1  # close() only releases NVML when the sampler was given on_close


def test_unsupported_fields_are_dropped_and_transient_errors_skipped(fake):
    fake.errors["nvmlDeviceGetPowerUsage"] = pynvml.NVML_ERROR_NOT_SUPPORTED
    fake.errors["nvmlDeviceGetClockInfo"] = pynvml.NVML_ERROR_UNKNOWN
    sampler = GpuSampler(fake, fake.nvmlDeviceGetHandleByIndex(0), interval_s=60.0)
    assert sampler.fields == ("util", "mem_gb", "sm_clock_mhz")  # power: not supported on this GPU, for good
    assert sampler.sample() == {"util": 50.0, "mem_gb": 10.0}  # the clock failed this time only
    del fake.errors["nvmlDeviceGetClockInfo"]
    assert sampler.sample()["sm_clock_mhz"] == 1980.0
    with sampler.phase("validate"):
        pass
    assert phase_metrics(sampler.take()) == {"gpu/util_validate": 50.0, "gpu/mem_gb_validate": 10.0,
                                             "gpu/sm_clock_mhz_validate": 1980.0}


def test_open_sampler_starts_and_close_releases_nvml():
    fake = FakeNvml()
    sampler = open_sampler(0, nvml=fake, interval_s=0.005)
    assert sampler is not None and fake.initialized == 1
    with sampler.phase("rollout"):
        wait_for(lambda: sampler.means("rollout").get("samples", 0) >= 2)
    sampler.close()
    assert fake.initialized == 0 and fake.calls["nvmlShutdown"] == 1
    calls = sum(fake.calls.values())
    time.sleep(0.03)
    assert sum(fake.calls.values()) == calls  # the thread is gone


def test_cuda_visible_devices_picks_the_nvml_index(monkeypatch):
    fake = FakeNvml(devices=6)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    sampler = open_sampler(1, nvml=fake, interval_s=60.0)
    try:
        assert sampler._handle.index == 5
    finally:
        sampler.close()


@pytest.mark.parametrize("case", ["no_driver", "no_such_gpu", "no_field"])
def test_open_sampler_is_none_when_nvml_cannot_serve(case):
    fake = FakeNvml(devices=0 if case == "no_such_gpu" else 1,
                    init_error=pynvml.NVML_ERROR_DRIVER_NOT_LOADED if case == "no_driver" else None)
    if case == "no_field":
        for name in API[4:]:
            fake.errors[name] = pynvml.NVML_ERROR_NOT_SUPPORTED
    assert open_sampler(0, nvml=fake) is None
    assert fake.initialized == 0  # whatever was opened was shut down again


def test_real_package_without_a_driver_gives_no_sampler():
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        pass
    else:
        pynvml.nvmlShutdown()
        pytest.skip("an NVIDIA driver is present here")
    assert open_sampler(0) is None and open_sampler(0, nvml=pynvml) is None


def test_missing_package_and_cpu_give_no_sampler_and_no_metrics(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # `import pynvml` raises ImportError
    assert open_sampler(0) is None
    assert telemetry.gpu_sampler("cpu") is None
    if not torch.cuda.is_available():
        assert telemetry.gpu_sampler() is None
    timer = PhaseTimer(None)
    with timer("rollout"):
        pass
    assert timer.gpu_metrics() == {} and set(timer.seconds) == {"rollout"}


def test_plot_draws_one_panel_per_gpu_field_with_a_line_per_phase(tmp_path):
    assert panel_and_line("gpu/sm_clock_mhz_rollout") == ("gpu/sm_clock_mhz", "rollout")
    assert panel_and_line("gpu/mem_gb_train") == ("gpu/mem_gb", "train")
    assert panel_and_line("timing/train_s") == ("timing/train_s", None)
    pytest.importorskip("matplotlib")
    rows = [{"step": s, "time": 0.0, "gpu/util_rollout": 80.0 + s, "gpu/util_train": 30.0, "gpu/power_w_train": 500.0}
            for s in (1, 2)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    written = plot_metrics(tmp_path / "metrics.jsonl", tmp_path / "plots")
    assert [p.name for p in written] == ["gpu.png"]
    from PIL import Image

    height = Image.open(written[0]).size[1]
    assert 2 * 2.2 * 90 * 0.9 < height < 2 * 2.2 * 90 * 1.1  # two panels (util, power), not three


def test_benchmark_reports_carry_the_scripts_gpu_telemetry(fake, monkeypatch, tmp_path):
    sys.path.insert(0, str(ROOT))
    from benchmarks import _common

    cpu_result = _common.timeit(lambda _: None, device=torch.device("cpu"), warmup=0, iters=2)
    assert "gpu" not in cpu_result
    if not torch.cuda.is_available():
        path = _common.write_results("t", {"x": 1}, tmp_path / "cpu.json")
        assert "gpu_telemetry" not in json.loads(path.read_text())
    sampler = GpuSampler(fake, fake.nvmlDeviceGetHandleByIndex(0), interval_s=0.005).start()
    try:
        sampler.begin("script")
        monkeypatch.setattr(_common, "_TELEMETRY", [sampler])
        with sampler.phase("timed"):  # the script phase is open too: both get the thread's readings
            wait_for(lambda: sampler.means("script").get("samples", 0) >= 2)
        path = _common.write_results("t", {"x": 1}, tmp_path / "gpu.json")
    finally:
        sampler.close()
    report = json.loads(path.read_text())["gpu_telemetry"]
    assert report.pop("samples") >= 2
    assert report == {"util": 50.0, "mem_gb": 10.0, "power_w": 300.0, "sm_clock_mhz": 1980.0}


TRAIN_WITH_FAKE_NVML = r'''
import sys
from fake_nvml import FakeNvml
import srpo_fast.train.grpo as grpo
from srpo_fast.train.__main__ import main
from srpo_fast.utils.telemetry import open_sampler

nvml = FakeNvml(util=77)
sampler = open_sampler(0, nvml=nvml, interval_s=0.01)
grpo.gpu_sampler = lambda device: sampler  # what a CUDA machine with NVML would hand the step loop
sys.exit(main(sys.argv[1:]))
'''


@pytest.mark.slow
def test_trainer_logs_and_plots_gpu_metrics_per_phase(tiny_kit, tmp_path):
    out = tmp_path / "run"
    args = ["--config", str(ROOT / "configs" / "demo_cpu.yaml"), f"model.path={tiny_kit['vl']}",
            f"train.output_dir={out}", "train.max_steps=1", "train.val_every=0", "rollout.max_tokens=8",
            "algo.filter_groups=false",  # the random tiny model scores 0 everywhere: keep its groups so it updates
            "log.progress=false", "train.export_final=false", "train.val_before_train=false"]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{TESTS}", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-c", TRAIN_WITH_FAKE_NVML, *args], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    for phase in ("rollout", "reward", "train", "sync"):
        assert row[f"gpu/util_{phase}"] == 77.0 and row[f"gpu/power_w_{phase}"] == 300.0, phase
        assert row[f"timing/{phase}_s"] > 0
    if (out / "plots").exists():  # matplotlib installed
        assert (out / "plots" / "gpu.png").is_file()
