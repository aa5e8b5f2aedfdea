"""benchmarks/kernels.py --smoke runs end to end on CPU and writes a well-formed, finite report."""
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

from bench_run import ROOT, run_benchmark

TIMES = ("fwd_ms", "bwd_ms", "fwd_bwd_ms", "peak_mem_MB", "extra_mem_MB")


def check_measured(result: dict, where: str) -> None:
    assert "skipped" not in result and "oom" not in result, (where, result)
    for key in TIMES:
        assert math.isfinite(result[key]) and result[key] >= 0, (where, key, result)
    assert result["fwd_ms"] > 0 and result["fwd_bwd_ms"] > 0, (where, result)
    assert math.isfinite(result["loss"]), where


def same_loss(methods: dict, a: str, b: str, rel: float = 1e-4) -> None:
    if "loss" in methods.get(a, {}) and "loss" in methods.get(b, {}):
        assert methods[a]["loss"] == pytest.approx(methods[b]["loss"], rel=rel), (a, b)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "kernels_smoke.json"
    return out, run_benchmark("kernels.py", "--smoke", out=out, timeout=600)


def test_report_structure_and_values(report):
    path, data = report
    assert data["benchmark"] == "kernels_smoke" and data["smoke"] is True
    assert data["environment"]["torch"] and data["copy_bandwidth_GBps"] > 0
    for row in data["linear_logprobs"]:
        for name in ("naive_torch", "ours", "ours_logp_only", "ours_logp_only_filtered"):
            check_measured(row["methods"][name], f"linear {name}")
        assert all(math.isfinite(v) and v > 0 for v in row["gemm_floor"].values())
        same_loss(row["methods"], "ours", "naive_torch")
        same_loss(row["methods"], "ours", "compiled_chunked_torch")
        same_loss(row["methods"], "ours_logp_only", "cce_filter_off")
        same_loss(row["methods"], "ours_logp_only", "ours_logp_only_filtered", rel=1e-6)  # forward unchanged
    for row in data["linear_grpo"]:
        check_measured(row["methods"]["ours"], "linear_grpo ours")
        same_loss(row["methods"], "ours", "liger_fused_linear_grpo")
    for row in data["token_logprobs"]:
        check_measured(row["methods"]["ours"], "token_logprobs ours")
        same_loss(row["methods"], "ours", "naive_torch")
        assert all(math.isfinite(v) and v > 0 for v in row["bandwidth"].values())
    for row in data["grpo_from_logits"]:
        check_measured(row["methods"]["ours"], "grpo_from_logits ours")
        same_loss(row["methods"], "ours", "liger_triton_grpo")
    for name, rec in data["targets"].items():
        assert rec["met"] in (True, False, None), name
        assert all(math.isfinite(v) for v in rec["values"].values()), name
    assert data["targets"]["linear_fwd_bwd_over_gemm_floor"]["values"]  # ours and the floor were both measured
    if importlib.util.find_spec("matplotlib") is not None:
        assert path.with_suffix(".png").stat().st_size > 0


def test_peers_present_here_were_measured(report):
    """Where liger-kernel / cut-cross-entropy are installed, their rows hold measurements, not skips."""
    _, data = report
    if importlib.util.find_spec("liger_kernel") is not None:
        check_measured(data["linear_grpo"][0]["methods"]["liger_fused_linear_grpo"], "liger chunked")
        check_measured(data["grpo_from_logits"][0]["methods"]["liger_triton_grpo"], "liger triton")
    if importlib.util.find_spec("cut_cross_entropy") is not None:
        check_measured(data["linear_logprobs"][0]["methods"]["cce_filter_off"], "cce")
        assert "skipped" in data["linear_logprobs"][0]["methods"]["cce_default_filter"]  # GPU-only filter
    check_measured(data["linear_logprobs"][0]["methods"]["compiled_chunked_torch"], "compiled")


def test_performance_model_beside_the_report(report):
    """The model (FLOPs, bytes, rooflines) is written beside the results, in JSON and markdown, for every kernel
    at the target shapes; its rooflines follow from its own FLOPs and bytes and the stated peaks."""
    path, _ = report
    model = json.loads(path.with_name(path.stem + "_model.json").read_text())
    assert path.with_name(path.stem + "_model.md").read_text().count("| linear_fwd |") == 4
    kernels = {r["kernel"] for r in model["rows"]}
    assert {"token_logprobs_fwd", "token_logprobs_bwd", "linear_fwd", "linear_dz", "linear_dhidden_gemm",
            "linear_dweight_gemm", "grpo_loss"} <= kernels
    for row in model["rows"]:
        for gpu, spec in model["gpus"].items():
            expect = max(row["GFLOP"] / spec["tflops"], row["GB"] / spec["tbps"])  # ms
            assert row[f"roofline_ms_{gpu}"] == pytest.approx(expect, rel=1e-9), (row["kernel"], gpu)
        if row["kernel"].startswith("linear"):
            assert row["bound_H100"] == "compute" and row["GFLOP"] == pytest.approx(
                2 * row["N"] * row["H"] * row["V"] / 1e9)
        if row["kernel"].startswith("token_logprobs"):
            assert row["bound_H100"] == "memory" and row["roofline_ms_H200"] < row["roofline_ms_H100"]


MODEL_FROM_SASS = """
import json, sys
sys.path.insert(0, "benchmarks")
from srpo_fast.kernels import compile_check as cc
from srpo_fast.kernels.linear_logprobs import compile_variants
import kernels as bench
tc, out = cc._toolchain(), {}
for v in compile_variants():
    if v.fast and v.gemm:
        rec = cc.compile_variant(v, 90, tc, {})
        kind = v.name.split("[")[0]
        out[kind] = bench.linear_sass_model(kind, rec, 16384, 3584, 152064)
print(json.dumps(out))
"""


def test_sass_model_of_the_compiled_linear_kernels():
    """From the real sm_90 SASS of the default linear configs: the model finds the K-loop and the softmax
    epilogue, the epilogue stays near the floor (<= 10 SASS instructions per logit), and at the target shape
    the kernels are bound by the tensor cores, not by instruction issue."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", MODEL_FROM_SASS], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    model = json.loads(proc.stdout.strip().splitlines()[-1])
    gemm_ms = 2 * 16384 * 3584 * 152064 / 989.4e12 * 1e3
    for kind in ("fwd", "dz"):
        m = model[kind]
        assert m is not None and m["spill_bytes"] == 0 and 40 < m["k_loop_instr"] < 120, m
        assert m["instr_bound_ms_H100"] < gemm_ms and m["expected_ms_H100"] >= gemm_ms, m
    assert model["fwd"]["epilogue_instr_per_logit"] <= 10, model["fwd"]
