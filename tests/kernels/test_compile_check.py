"""The compile check: the fast subset of every op's kernels compiles for sm_90 and sm_80 with no spill, tensor
cores in every GEMM and shared memory within the limit; and the verdict really fails on each of those."""
import json
import os
import subprocess
import sys

import pytest

from srpo_fast.kernels import compile_check as cc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory):
    """One real run of the checker (its own process: the kernels must be built without the interpreter)."""
    problem = cc.toolchain_problem()
    if problem:  # e.g. the GPU test machine's older triton: the CPU CI runs this check
        pytest.skip(problem)
    out = tmp_path_factory.mktemp("compile") / "fast.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "srpo_fast.kernels.compile_check", "--arch", "90,80", "--fast",
                           "--only", "token_logprobs", "grpo_loss", "linear_logprobs",
                           "--json", str(out)], capture_output=True, text=True, env=env, timeout=900, cwd=ROOT)
    assert out.is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads(out.read_text())


def test_fast_subset_compiles_clean_for_hopper_and_ampere(fast_run):
    proc, report = fast_run
    records = report["records"]
    assert report["meta"]["failures"] == [], report["meta"]["failures"]
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert {r["op"] for r in records} == set(cc.OPS)
    assert {r["arch"] for r in records} == {90, 80}
    for r in records:
        assert r["ok"] and r["regs"] and r["spill_bytes"] == 0 and r["shared"] <= r["smem_limit"], r
        if r["gemm"]:  # Hopper's warpgroup MMA on sm_90, mma.sync on sm_80
            assert r["tensor_cores"] == ("wgmma" if r["arch"] == 90 else "mma"), r
    streaming = [r for r in records if r["op"] == "token_logprobs"]  # the floor: <= 12 per logit, no barrier
    assert streaming and all(r["sass_per_elem"] <= 12 and r["steady_loop"]["BAR"] == 0 for r in streaming)


def record(**over):
    base = dict(op="op", name="v", arch=90, ok=True, selectable=True, group=None, regs=64, spill_bytes=0,
                shared=1024, smem_limit=232448, fits_smem=True, ctas_per_sm=4, num_warps=4, gemm=False,
                tensor_cores="none", sass_per_elem=None)
    return {**base, **over}


@pytest.mark.parametrize("bad,reason", [
    (dict(ok=False, error="CompilationError: at 3:4\ncaused by ValueError: boom"), "compile error"),
    (dict(spill_bytes=96), "spills 96 B"),
    (dict(shared=300000, fits_smem=False), "shared memory 300000 B"),
    (dict(gemm=True, tensor_cores="none"), "without tensor-core"),
    (dict(ctas_per_sm=0), "do not fit an SM"),
    (dict(sass_per_elem=21.1, sass_budget=12), "21.1 SASS instructions per element > its budget 12"),
])
def test_verdict_fails_on_each_defect(bad, reason):
    assert cc.verdict([record(sass_per_elem=11.9, sass_budget=12)]) == []
    fails = cc.verdict([record(**bad)])
    assert len(fails) == 1 and reason in fails[0], fails


def test_verdict_autotune_groups_and_unselectable_variants():
    over = dict(group="fwd", shared=300000, fits_smem=False, spill_bytes=40)
    # one candidate too big for the device is pruned by the autotuner (its spills never run) ...
    assert cc.verdict([record(group="fwd"), record(name="big", **over)]) == []
    # ... but a group where no candidate fits would never launch
    fails = cc.verdict([record(name="big", **over)])
    assert len(fails) == 1 and "no autotune candidate fits" in fails[0]
    assert cc.verdict([record(spill_bytes=8, selectable=False)]) == []


def test_sass_loop_parsing_finds_the_innermost_loading_loop():
    sass = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   LDG.E R2, desc[UR4][R4.64] ;
        /*0020*/                   FADD R3, R2, R2 ;
        /*0030*/              @P0 BRA 0x10 ;
        /*0040*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0050*/                   MUFU.EX2 R5, R3 ;
        /*0060*/                   BRA 0x50 ;
    """
    ins = cc.sass_instructions(sass)
    assert len(ins) == 7 and ins[3] == (0x30, "BRA 0x10")
    loops = cc.sass_loops(ins)
    assert [lp["instr"] for lp in loops] == [2, 3]
    assert loops[0]["MUFU"] == 1 and loops[0]["LDG"] == 0
    steady = cc.steady_loop(loops)
    assert steady["instr"] == 3 and steady["LDG"] == 1


def test_occupancy_is_limited_by_registers_threads_or_shared_memory():
    assert cc.occupancy(32, 1, 0, 90) == (32, "blocks")
    assert cc.occupancy(255, 8, 98304, 90) == (1, "regs")
    assert cc.occupancy(64, 4, 120000, 90) == (1, "smem")
    assert cc.occupancy(32, 16, 64, 90)[0] == 4  # 512 threads: 4 CTAs fill the SM's 2048 threads


def test_markdown_report_summarizes_and_lists_failures(fast_run):
    _, report = fast_run
    records = report["records"] + [record(op="token_logprobs", name="fwd[broken]", ok=False,
                                          error="CompilationError: x\ncaused by ValueError: bad | shape")]
    meta = dict(report["meta"], failures=cc.verdict(records))
    text = cc.markdown(records, meta)
    assert "**Failures: 1**" in text and "sm_90 token_logprobs:fwd[broken]: compile error" in text
    assert "bad / shape" in text  # table-safe
    rows = {(g["op"], g["kernel"], g["arch"]): g for g in cc.summary(records)}
    fwd = rows[("token_logprobs", "fwd", 90)]
    assert fwd["ok"] == fwd["variants"] - 1 and fwd["barriers_in_loop"] == 0 and fwd["sass_per_elem"][1] <= 12
    assert rows[("linear_logprobs", "fwd", 90)]["tensor_cores"] == ["wgmma"]


def test_variants_below_their_min_arch_are_reported_not_judged():
    from srpo_fast.kernels._variants import KernelVariant

    v = KernelVariant("op", "v", kernel=None, args={}, num_warps=4, min_arch=90)
    tc = dict(JITFunction=type(None), Heuristics=type(None))
    assert cc.compile_variant(v, 80, tc, {})["selectable"] is False  # kernel=None: a failed build, not judged
    assert cc.verdict([cc.compile_variant(v, 80, tc, {})]) == []
    assert cc.compile_variant(v, 90, tc, {})["selectable"] is True
