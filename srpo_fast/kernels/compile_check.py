"""Compile every selectable kernel variant for NVIDIA GPUs on a machine without one, and say what the SASS costs.

    python -m srpo_fast.kernels.compile_check --arch 90,80 [--json F] [--md F] [--fast] [--only OP ...]

Why: our kernels run in the Triton interpreter on CPU CI, which never compiles them. Triton 3.9 compiles a
``@triton.jit`` kernel for any CUDA target without a GPU (the wheel bundles ``ptxas``, ``ptxas-blackwell`` for
sm_90+, and ``cuobjdump``), so every CI run can see a compile error, a register spill, a GEMM that missed the
tensor cores, or shared memory over the device limit.

Each op module declares its variants with ``compile_variants()`` (see ``_variants.KernelVariant``); this file
builds each one exactly as ``JITFunction.run`` would for those argument values, then reports per variant and
arch: ok or the compiler's error, registers/thread, spill bytes (``ptxas -v`` on Triton's PTX with Triton's
flags), shared memory against the arch limit, CTAs per SM, tensor-core instructions (wgmma / mma.sync in the
PTX, HGMMA / HMMA in the SASS), and the SASS of the innermost loop that loads from global memory (the steady
loop), per element where the kernel streams. Exit status 1 when a selectable variant fails (see ``verdict``).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OPS = ("token_logprobs", "linear_logprobs", "grpo_loss")

# per-arch limits: max dynamic shared memory per CTA (opt-in), per SM, registers and threads per SM
ARCHS = {
    90: dict(name="H100/H200 (sm_90a)", smem_cta=232448, smem_sm=233472, regs_sm=65536, threads_sm=2048),
    80: dict(name="A100 (sm_80)", smem_cta=166912, smem_sm=167936, regs_sm=65536, threads_sm=2048),
    89: dict(name="L40S (sm_89)", smem_cta=101376, smem_sm=102400, regs_sm=65536, threads_sm=1536),
    100: dict(name="B200 (sm_100a)", smem_cta=232448, smem_sm=233472, regs_sm=65536, threads_sm=2048),
}
PTX_COUNTS = {
    "wgmma": r"\bwgmma\.mma_async\.",
    "mma_sync": r"\bmma\.sync\.",
    "tma": r"\bcp\.async\.bulk\.tensor",
    "cp_async": r"\bcp\.async\.(?:ca|cg)\.",
    "atomics": r"\b(?:atom|red)\.global\.",
}
SASS_OPS = ("MUFU", "BAR", "SHFL", "HGMMA", "HMMA", "LDG", "STG", "LDGSTS", "UTMALDG")


def _interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# ----------------------------------------------------------------------------------------------- compiling
def toolchain_problem() -> str | None:
    """Why this environment cannot run the check (None when it can): it needs Triton's NVIDIA backend with
    the launch-time specializer this file mirrors (Triton 3.9's ``native_specialize_impl``)."""
    try:
        import triton
        from triton.backends.nvidia import compiler as nv
        from triton.runtime import jit
    except ImportError as exc:
        return f"triton with its NVIDIA backend is not importable ({exc})"
    if not hasattr(jit, "native_specialize_impl") or not hasattr(jit, "MockTensor"):
        return f"triton {triton.__version__} lacks the launch-time specializer the check mirrors (needs 3.9)"
    if not os.path.exists(nv.get_ptxas(90).path):
        return "the triton wheel ships no ptxas"
    return None


def _toolchain():
    """Triton's compiler entry points, imported late: TRITON_INTERPRET must be unset before triton loads."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia import compiler as nv
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.autotuner import Autotuner, Heuristics
    from triton.runtime.jit import JITFunction, MockTensor, native_specialize_impl
    return dict(triton=triton, GPUTarget=GPUTarget, nv=nv, ASTSource=ASTSource, make_backend=make_backend,
                Autotuner=Autotuner, Heuristics=Heuristics, JITFunction=JITFunction, MockTensor=MockTensor,
                specialize=native_specialize_impl)


def _unwrap(kernel, tc, args: dict):
    """The JITFunction under Autotuner/Heuristics wrappers, with heuristics applied to ``args`` as at launch."""
    args = dict(args)
    while not isinstance(kernel, tc["JITFunction"]):
        if isinstance(kernel, tc["Heuristics"]):
            for name, fn in kernel.values.items():
                args[name] = fn(args)
        kernel = kernel.fn
    return kernel, args


def _specialize(fn, args: dict, backend, tc):
    """signature, constexprs and attrs exactly as JITFunction.run builds them for these argument values."""
    from ._variants import TensorArg

    sig, constexprs, attrs = {}, {}, {}
    for i, kp in enumerate(fn.params):
        if kp.name in args:
            value = args[kp.name]
        elif kp.has_default:
            value = kp.default
        else:
            raise KeyError(f"{fn.__name__}: the variant gives no value for argument {kp.name!r}")
        if isinstance(value, TensorArg):
            value = tc["MockTensor"](value.dtype)  # data_ptr() == 0: 16-byte aligned
        if kp.is_constexpr:
            sig[kp.name] = "constexpr"
            constexprs[(i,)] = value
            continue
        ty, spec = tc["specialize"](backend, value, kp.is_const, not kp.do_not_specialize,
                                    not kp.do_not_specialize_on_alignment)
        if kp.annotation_type and isinstance(kp.annotation_type, str):
            ann = kp.annotation_type
            spec = None if (ann == "u1" or ann[:2] in ("fp", "bf")) else spec
            ty = ann
        sig[kp.name] = ty
        if ty == "constexpr":
            constexprs[(i,)] = spec
        elif isinstance(spec, str):
            attrs[(i,)] = backend.parse_attr(spec)
    unknown = set(args) - {kp.name for kp in fn.params}
    if unknown:
        raise KeyError(f"{fn.__name__}: the variant names arguments the kernel does not have: {sorted(unknown)}")
    return sig, constexprs, attrs


def _ptxas_stats(ptx: str, arch: int, fp_fusion: bool, tc) -> dict:
    """Registers, spills and stack of Triton's PTX, from ``ptxas -v`` run with the flags Triton uses."""
    nv = tc["nv"]
    ptxas = nv.get_ptxas(arch).path
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        Path(src).write_text(ptx)
        cmd = [ptxas, "-lineinfo", *([] if fp_fusion else ["--fmad=false"]), "-v", "--regAllocOptLevel=2",
               f"--gpu-name={nv.sm_arch_from_capability(arch)}", src, "-o", os.path.join(d, "k.o")]
        out = subprocess.run(cmd, capture_output=True, text=True)
    log = out.stderr + out.stdout
    if out.returncode != 0:
        raise RuntimeError(f"ptxas -v failed: {log[-2000:]}")
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    stack, spill_st, spill_ld = map(int, spill.groups()) if spill else (0, 0, 0)
    return dict(regs=int(regs.group(1)) if regs else None, stack=stack, spill_bytes=spill_st + spill_ld,
                ptxas=os.path.basename(ptxas))


def sass_instructions(sass_text: str) -> list[tuple[int, str]]:
    """(address, opcode) per SASS instruction in ``cuobjdump -sass`` output, predicates stripped."""
    out = []
    for line in sass_text.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m:
            body = re.sub(r"^@!?U?P\w+\s+", "", m.group(2).strip())
            out.append((int(m.group(1), 16), body))
    return out


def sass_loops(ins: list[tuple[int, str]]) -> list[dict]:
    """Loops (backward branches) innermost (shortest) first, with their length and key opcode counts."""
    spans = set()
    for addr, body in ins:
        if body.startswith("BRA"):
            target = re.search(r"0x([0-9a-f]+)", body)
            if target and int(target.group(1), 16) <= addr:
                spans.add((int(target.group(1), 16), addr))
    loops = []
    for lo, hi in sorted(spans, key=lambda span: (span[1] - span[0], span[0])):
        ops = [body.split()[0].split(".")[0] for a, body in ins if lo <= a <= hi]
        loops.append({"instr": len(ops), **{k: ops.count(k) for k in SASS_OPS}})
    return loops


def steady_loop(loops: list[dict]) -> dict | None:
    """The innermost loop that reads global memory: where a streaming or GEMM kernel spends its time."""
    for loop in loops:
        if loop["LDG"] or loop["LDGSTS"] or loop["UTMALDG"] or loop["HGMMA"] or loop["HMMA"]:
            return loop
    return loops[0] if loops else None


def _sass(cubin: bytes, arch: int, tc) -> str:
    tool = os.path.join(os.path.dirname(tc["nv"].get_ptxas(arch).path), "cuobjdump")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        Path(path).write_bytes(cubin)
        out = subprocess.run([tool, "-sass", path], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"cuobjdump -sass failed: {out.stderr[-2000:]}")
    return out.stdout


def occupancy(regs: int, num_warps: int, smem: int, arch: int) -> tuple[int, str]:
    """CTAs per SM and what limits it (registers are allocated per warp in units of 256)."""
    dev = ARCHS[arch]
    regs_per_warp = ((regs * 32 + 255) // 256) * 256
    limits = {"regs": dev["regs_sm"] // max(1, regs_per_warp * num_warps),
              "smem": dev["smem_sm"] // smem if smem else 1 << 30,
              "threads": dev["threads_sm"] // (32 * num_warps),
              "blocks": 32}  # resident CTAs per SM on sm_80/sm_90
    which = min(limits, key=limits.get)
    return limits[which], which


def compile_variant(variant, arch: int, tc, cache: dict) -> dict:
    """Compile one variant for one arch and measure it; failures come back as a record, never raise."""
    rec = dict(op=variant.op, name=variant.name, arch=arch, num_warps=variant.num_warps,
               num_stages=variant.num_stages, gemm=variant.gemm,
               selectable=variant.selectable and arch >= (variant.min_arch or 0),
               group=variant.group, sass_budget=variant.sass_budget,
               shape={k: str(v) for k, v in variant.shape.items()})
    t0 = time.perf_counter()
    try:
        fn, args = _unwrap(variant.kernel, tc, variant.args)
        target = tc["GPUTarget"]("cuda", arch, 32)
        backend = tc["make_backend"](target)
        sig, constexprs, attrs = _specialize(fn, args, backend, tc)
        options = dict(num_warps=variant.num_warps, num_stages=variant.num_stages, **variant.options)
        key = (fn.__module__, fn.__name__, arch, repr(sorted(sig.items())), repr(sorted(constexprs.items(),
               key=str)), repr(sorted(attrs.items(), key=str)), repr(sorted(options.items())))
        if key in cache:  # same specialization as an earlier variant (e.g. two vocab sizes, both % 16 == 0)
            same = ("op", "name", "shape", "selectable", "group")
            return {**cache[key], **{k: rec[k] for k in same}, "compile_s": 0.0}
        src = tc["ASTSource"](fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
        ck = tc["triton"].compile(src, target=target, options=options)
        ptx = ck.asm["ptx"]
        rec.update(ok=True, kernel=ck.metadata.name, shared=int(ck.metadata.shared),
                   **_ptxas_stats(ptx, arch, ck.metadata.enable_fp_fusion, tc))
        rec.update({k: len(re.findall(p, ptx)) for k, p in PTX_COUNTS.items()})
        ins = sass_instructions(_sass(ck.asm["cubin"], arch, tc))
        loops = sass_loops(ins)
        rec["sass_total"] = len(ins)
        rec["sass_ops"] = {k: sum(1 for _, b in ins if b.split()[0].split(".")[0] == k) for k in SASS_OPS}
        rec["loops"] = loops[:4]
        loop = steady_loop(loops)
        rec["steady_loop"] = loop
        rec["sass_per_elem"] = None
        if loop and variant.stream_elems:
            per_thread = variant.stream_elems / (32 * variant.num_warps)
            rec["sass_per_elem"] = round(loop["instr"] / per_thread, 2)
        limit = ARCHS[arch]["smem_cta"]
        rec["smem_limit"] = limit
        rec["fits_smem"] = rec["shared"] <= limit
        rec["ctas_per_sm"], rec["occupancy_limit"] = occupancy(rec["regs"] or 0, variant.num_warps, rec["shared"],
                                                               arch)
        rec["tensor_cores"] = ("wgmma" if rec["wgmma"] else "mma" if rec["mma_sync"] else "none")
    except Exception as exc:  # noqa: BLE001 - the compiler's own message is the result
        msgs = [f"{type(exc).__name__}: {exc}".strip()]
        cause = exc.__cause__ or exc.__context__
        while cause is not None and len(msgs) < 4:  # CompilationError carries the real reason as its cause
            msgs.append(f"caused by {type(cause).__name__}: {cause}".strip())
            cause = cause.__cause__ or cause.__context__
        rec.update(ok=False, error="\n".join(msgs)[-3000:])
        key = None
    rec["compile_s"] = round(time.perf_counter() - t0, 2)
    if key is not None:
        cache[key] = rec
    return rec


# ----------------------------------------------------------------------------------------------- collecting
def collect_variants(ops=OPS, fast: bool = False) -> list:
    """Every op module's ``compile_variants()``, or only the ``fast`` ones; labels must be unique."""
    variants = []
    for op in ops:
        module = importlib.import_module(f"srpo_fast.kernels.{op}")
        declare = getattr(module, "compile_variants", None)
        if declare is None:
            raise RuntimeError(f"srpo_fast.kernels.{op} declares no compile_variants()")
        variants += [v for v in declare() if v.fast or not fast]
    labels = [v.label for v in variants]
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    if dupes:
        raise RuntimeError(f"duplicate variant labels: {dupes}")
    return variants


# ----------------------------------------------------------------------------------------------- judging
def verdict(records: list[dict]) -> list[str]:
    """Why the check fails (empty list: it passes). A selectable variant fails on: a compile error, any
    spill, shared memory over the arch limit (for an autotune candidate only when no candidate of its group
    fits: the autotuner skips the others), registers the SM cannot hold, a GEMM with no tensor-core
    instruction, and a streaming steady loop above the op's own budget of SASS instructions per element."""
    fails, groups = [], {}
    for r in records:
        if not r.get("selectable", True):
            continue
        where = f"sm_{r['arch']} {r['op']}:{r['name']}"
        if not r["ok"]:
            fails.append(f"{where}: compile error: {short_error(r['error'])}")
            continue
        fits = r["fits_smem"] and r["ctas_per_sm"] >= 1
        if r.get("group"):
            groups.setdefault((r["arch"], r["op"], r["group"]), []).append(fits)
        elif not r["fits_smem"]:
            fails.append(f"{where}: shared memory {r['shared']} B > {r['smem_limit']} B")
        elif r["ctas_per_sm"] < 1:
            fails.append(f"{where}: {r['regs']} registers x {r['num_warps']} warps do not fit an SM")
        if not fits:
            continue  # never launched: its spills and code do not matter
        if r["spill_bytes"]:
            fails.append(f"{where}: spills {r['spill_bytes']} B ({r['regs']} registers)")
        if r["gemm"] and r["tensor_cores"] == "none":
            fails.append(f"{where}: GEMM without tensor-core instructions (FMA code)")
        per, budget = r.get("sass_per_elem"), r.get("sass_budget")
        if budget is not None and per is not None and per > budget:
            fails.append(f"{where}: {per} SASS instructions per element > its budget {budget}")
    for (arch, op, group), fits in groups.items():
        if not any(fits):
            fails.append(f"sm_{arch} {op}:{group}: no autotune candidate fits the device (would never launch)")
    return fails


def short_error(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return "?"
    causes = [line for line in lines if line.startswith("caused by ")]
    return lines[0] if len(lines) == 1 else f"{lines[0][:200]} ... {(causes or lines)[-1][:300]}"


# ----------------------------------------------------------------------------------------------- reporting
def summary(records: list[dict]) -> list[dict]:
    """Per op, kernel family (the variant name before '[') and arch: how many variants, how many compile,
    the worst registers / spills / occupancy, tensor-core use and the range of SASS per element."""
    groups: dict[tuple, list] = {}
    for r in records:
        groups.setdefault((r["op"], r["name"].split("[")[0], r["arch"]), []).append(r)
    out = []
    for (op, family, arch), rs in groups.items():
        ok = [r for r in rs if r["ok"]]
        per = [r["sass_per_elem"] for r in ok if r.get("sass_per_elem") is not None]
        loops = [r["steady_loop"]["instr"] for r in ok if r.get("steady_loop")]
        out.append(dict(
            op=op, kernel=family, arch=arch, variants=len(rs), ok=len(ok),
            max_regs=max((r["regs"] or 0 for r in ok), default=None),
            max_spill=max((r["spill_bytes"] for r in ok), default=None),
            spilling=sum(1 for r in ok if r["spill_bytes"]),
            max_smem=max((r["shared"] for r in ok), default=None),
            min_ctas=min((r["ctas_per_sm"] for r in ok), default=None),
            tensor_cores=sorted({r["tensor_cores"] for r in ok}),
            barriers_in_loop=max((r["steady_loop"]["BAR"] for r in ok if r.get("steady_loop")), default=None),
            loop_instr=(min(loops), max(loops)) if loops else None,
            sass_per_elem=(min(per), max(per)) if per else None))
    return out


def _span(pair) -> str:
    if not pair:
        return ""
    lo, hi = pair
    return f"{lo}" if lo == hi else f"{lo}-{hi}"


def markdown(records: list[dict], meta: dict) -> str:
    """The report committed under benchmarks/results/compile/: a summary per kernel, then every variant."""
    lines = [f"# Kernel compile check: triton {meta['triton']}, targets {', '.join(meta['archs'])}", "",
             f"Ops: {', '.join(meta.get('ops', OPS))}.", "",
             "Generated by `python -m srpo_fast.kernels.compile_check` on a CPU-only machine "
             f"({meta['variants']} variants per arch, {meta['seconds']} s; `benchmarks/run_all.py` regenerates it). "
             "Steady loop: the innermost SASS loop that loads global memory; SASS/elem: its instructions per "
             "streamed element per thread. Spills are bytes stored + loaded per thread.", "",
             f"**Failures: {len(meta['failures'])}**", *[f"- {f}" for f in meta["failures"]], "",
             "## Summary per kernel", "",
             "| op | kernel | arch | compiled | max regs | spilling variants (max B) | max smem B | min CTAs/SM | "
             "tensor cores | BAR in steady loop | steady loop instr | SASS/elem |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for g in summary(records):
        lines.append(f"| {g['op']} | {g['kernel']} | sm_{g['arch']} | {g['ok']}/{g['variants']} | {g['max_regs']} | "
                     f"{g['spilling']} ({g['max_spill']}) | {g['max_smem']} | {g['min_ctas']} | "
                     f"{', '.join(g['tensor_cores'])} | {g['barriers_in_loop']} | {_span(g['loop_instr'])} | "
                     f"{_span(g['sass_per_elem'])} |")
    lines += ["", "## Every variant", "",
              "| op | variant | arch | ok | warps/stages | regs | spill B | smem B (limit) | CTAs/SM | tensor cores | "
              "steady loop instr (MUFU/BAR/SHFL) | SASS/elem |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        if not r["ok"]:
            lines.append(f"| {r['op']} | {r['name']} | sm_{r['arch']} | **FAIL** | | | | | | | "
                         f"{short_error(r['error'])[:200].replace('|', '/')} | |")
            continue
        loop = r.get("steady_loop") or {}
        tc = r["tensor_cores"] + (f" ({r['wgmma'] or r['mma_sync']})" if r["tensor_cores"] != "none" else "")
        loop_s = f"{loop['instr']} ({loop['MUFU']}/{loop['BAR']}/{loop['SHFL']})" if loop else "no loop"
        lines.append(f"| {r['op']} | {r['name']} | sm_{r['arch']} | ok | {r['num_warps']}/{r['num_stages']} | "
                     f"{r['regs']} | {r['spill_bytes']} | {r['shared']} ({r['smem_limit']}) | {r['ctas_per_sm']} "
                     f"({r['occupancy_limit']}) | {tc} | {loop_s} | {r.get('sass_per_elem') or ''} |")
    return "\n".join(lines) + "\n"


def _reexec_without_interpreter() -> None:
    """The kernels were decorated for the interpreter: restart this command with TRITON_INTERPRET unset."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    os.execve(sys.executable, [sys.executable, "-m", "srpo_fast.kernels.compile_check", *sys.argv[1:]], env)


def run(archs: list[int], ops=OPS, fast: bool = False, progress=print) -> tuple[list[dict], dict]:
    """Compile every (fast) variant of ``ops`` for ``archs``; returns (records, meta with the failures)."""
    tc = _toolchain()
    for arch in archs:
        if arch not in ARCHS:
            raise ValueError(f"unknown arch {arch}; known: {sorted(ARCHS)}")
    t0 = time.perf_counter()
    variants = collect_variants(ops, fast)
    records, cache = [], {}
    for arch in archs:
        for v in variants:
            r = compile_variant(v, arch, tc, cache)
            records.append(r)
            if progress:
                status = "ok" if r["ok"] else "FAIL"
                extra = (f"regs={r['regs']} spill={r['spill_bytes']} smem={r['shared']} tc={r['tensor_cores']} "
                         f"loop={(r.get('steady_loop') or {}).get('instr')} per_elem={r.get('sass_per_elem')}"
                         if r["ok"] else short_error(r["error"]))
                progress(f"[sm_{arch}] {v.label:70s} {status} {extra} ({r['compile_s']} s)")
    failures = verdict(records)
    meta = dict(triton=tc["triton"].__version__, archs=[f"sm_{a}" for a in archs], ops=list(ops),
                variants=len(variants),
                seconds=round(time.perf_counter() - t0, 1), failures=failures,
                ptxas={f"sm_{a}": tc["nv"].get_ptxas(a).path.rsplit("/", 1)[-1] for a in archs})
    return records, meta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="90,80", help="comma-separated compute capabilities (default 90,80)")
    parser.add_argument("--json", type=Path, help="write every record to this JSON file")
    parser.add_argument("--md", type=Path, help="write the markdown table to this file")
    parser.add_argument("--fast", action="store_true", help="only the variants marked fast (the test-suite subset)")
    parser.add_argument("--only", nargs="+", choices=OPS, default=list(OPS), help="ops to check")
    args = parser.parse_args(argv)
    if _interpreter_on():
        _reexec_without_interpreter()
    problem = toolchain_problem()
    if problem:
        print(f"compile check cannot run here: {problem}", file=sys.stderr)
        return 2
    archs = [int(a) for a in args.arch.split(",") if a.strip()]
    records, meta = run(archs, args.only, args.fast)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(meta=meta, records=records), indent=1) + "\n")
    if args.md:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(markdown(records, meta))
    ok = sum(r["ok"] for r in records)
    print(f"compiled {ok}/{len(records)} variant builds in {meta['seconds']} s; failures: {len(meta['failures'])}")
    for f in meta["failures"]:
        print("  FAIL", f)
    return 1 if meta["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
