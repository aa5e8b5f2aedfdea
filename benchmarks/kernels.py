"""Benchmark of srpo_fast.kernels against naive torch, torch.compile, Liger-Kernel and Apple's CCE.

    python benchmarks/kernels.py                 # CUDA: the full grid, writes benchmarks/results/kernels.{json,png}
    python benchmarks/kernels.py --smoke --out X # CPU, tiny shapes, a few seconds: keeps the script from rotting

Sections (fwd, bwd and fwd+bwd time, peak memory of fwd+bwd above the inputs):
  linear_logprobs   hidden [N, H] x LM head [V, H] -> per-token log-prob (+ entropy): naive torch on full logits,
                    torch.compile'd row-chunked torch (checkpointed), CCE (reduction none), ours; plus the cuBLAS
                    floor of the same GEMMs (2NHV flop forward, 6NHV backward).
  linear_grpo       the whole GRPO loss from hidden states: Liger's LigerFusedLinearGRPOLoss vs ours
                    (linear_token_logprobs + grpo_loss).
  token_logprobs    from materialized bf16 logits [N, V]: naive torch vs ours, and our achieved HBM bandwidth.
  grpo_from_logits  Liger's triton_grpo_loss vs ours (token_logprobs + grpo_loss) on logits.
Peers that are not installed are recorded as skipped; a configuration that runs out of memory as oom. Each
method's loss value is recorded too, so a reader (and the smoke test) can check the peers compute the same thing.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import torch  # noqa: E402

from benchmarks._common import (  # noqa: E402
    free_memory,
    is_oom,
    peak_memory_bytes,
    plot_bars,
    timeit,
    write_results,
)

VOCAB = 152_064
CCE_FILTER_EPS = 2.0 ** -12  # CCE's "high" filter for bf16: our filtered mode at the same threshold
SEQ_LEN = 512  # tokens per sequence in the GRPO sections
SECTIONS = ("linear_logprobs", "linear_grpo", "token_logprobs", "grpo_from_logits")
TARGETS = {
    "linear_fwd_bwd_over_gemm_floor": ("<=", 1.15),
    "linear_grpo_speedup_vs_liger_chunked": (">=", 1.5),
    "linear_speedup_vs_cce": (">=", 1.2),  # exact vs exact: CCE's filter off, ours by default
    "linear_filtered_speedup_vs_cce_default": (">=", 1.2),  # CCE's default filter vs ours at 2^-12
    "linear_extra_memory_fraction_of_fp32_logits": ("<=", 0.05),
    "token_logprobs_fraction_of_copy_bandwidth": (">=", 0.8),
}


# ------------------------------------------------------------------ methods: each maps inputs to a scalar loss
# (sum of log-probs minus half the sum of entropies where entropy is computed: the same number for every method)
def naive_logprobs(hidden, weight, targets, with_entropy=True):
    log_p = torch.log_softmax((hidden @ weight.T).float(), dim=-1)
    out = log_p.gather(-1, targets[:, None]).sum()
    if with_entropy:
        out = out + 0.5 * (log_p.exp() * log_p).sum()
    return out


def naive_from_logits(logits, targets):
    log_p = torch.log_softmax(logits.float(), dim=-1)
    return log_p.gather(-1, targets[:, None]).sum() + 0.5 * (log_p.exp() * log_p).sum()


def make_compiled_chunked(rows: int = 1024) -> Callable:
    """torch.compile'd naive log-prob + entropy over row chunks, each checkpointed so logits are recomputed."""
    from torch.utils.checkpoint import checkpoint

    @torch.compile(dynamic=False)
    def chunk_fn(h, w, t):
        log_p = torch.log_softmax((h @ w.T).float(), dim=-1)
        return log_p.gather(-1, t[:, None]).sum() + 0.5 * (log_p.exp() * log_p).sum()

    def run(hidden, weight, targets):
        total = 0.0
        for start in range(0, hidden.shape[0], rows):
            sl = slice(start, start + rows)
            total = total + checkpoint(chunk_fn, hidden[sl], weight, targets[sl], use_reentrant=False)
        return total

    return run


def make_cce(device: torch.device, filter_eps) -> Callable | str:
    """Apple's CCE (reduction none). ``filter_eps=None`` turns its gradient filter off (exact, as our default);
    "high" is its default filter. On CPU its torch_compile implementation runs, which has no filter."""
    try:
        from cut_cross_entropy import linear_cross_entropy
    except ImportError:
        return "cut-cross-entropy not installed"
    if device.type == "cuda":
        return lambda h, w, t: -linear_cross_entropy(h, w, t, reduction="none", impl="cce",
                                                     filter_eps=filter_eps).sum()
    return lambda h, w, t: -linear_cross_entropy(h, w, t, reduction="none", impl="torch_compile").sum()


def ours_linear(with_entropy: bool, grad_filter_eps: float | None = None) -> Callable:
    from srpo_fast.kernels import linear_token_logprobs

    def run(hidden, weight, targets):
        out = linear_token_logprobs(hidden, weight, targets, return_entropy=with_entropy, check=False,
                                    grad_filter_eps=grad_filter_eps)
        return out[0].sum() - 0.5 * out[1].sum() if with_entropy else out.sum()

    return run


def grpo_batch(n: int, seq_len: int, device: torch.device, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Per-token GRPO inputs for n tokens as n // seq_len sequences of seq_len, the last fifth masked out."""
    batch = n // seq_len
    mask = torch.ones(batch, seq_len, dtype=torch.float32)
    mask[:, seq_len * 4 // 5:] = 0
    base = -torch.rand(batch, seq_len, generator=gen) * 3
    return {"old": (base + 0.2 * torch.randn(batch, seq_len, generator=gen)).to(device),
            "ref": (base + 0.1 * torch.randn(batch, seq_len, generator=gen)).to(device),
            "adv": torch.randn(batch, generator=gen).to(device), "mask": mask.to(device),
            "cu": torch.arange(0, batch + 1, dtype=torch.int32, device=device) * seq_len}


def ours_grpo_tail(logp, g):
    from srpo_fast.kernels import grpo_loss

    return grpo_loss(logp, g["old"].reshape(-1), g["adv"], g["mask"].reshape(-1), g["cu"], g["ref"].reshape(-1),
                     clip_low=0.2, clip_high=0.28, kl_coef=0.04, check=False)[0]


def make_liger_chunked(device: torch.device) -> Callable | str:
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    except ImportError:
        return "liger-kernel not installed"
    module = LigerFusedLinearGRPOLoss(beta=0.04, compiled=device.type == "cuda", use_ref_model=True,
                                      epsilon_low=0.2, epsilon_high=0.28, loss_type="dapo", temperature=1.0)

    def run(hidden, weight, targets, g):
        batch = g["adv"].shape[0]
        return module(hidden.view(batch, -1, hidden.shape[-1]), weight, targets.view(batch, -1), g["mask"],
                      g["adv"], ref_per_token_logps=g["ref"], old_per_token_logps=g["old"])[0]

    return run


def make_liger_triton(device: torch.device) -> Callable | str:
    try:
        from liger_kernel.transformers.grpo_loss import triton_grpo_loss
    except ImportError:
        return "liger-kernel not installed"

    def run(logits3d, ids, g):
        return triton_grpo_loss(logits3d, g["old"], g["ref"], ids.view(g["adv"].shape[0], -1), g["adv"],
                                completion_mask=g["mask"], temperature=1.0, beta=0.04, eps_low=0.2, eps_high=0.28,
                                loss_type="dapo", reduce=True)[0]

    return run


# ------------------------------------------------------------------ measurement
def measure(loss_fn: Callable[[], torch.Tensor], leaves: list[torch.Tensor], device: torch.device,
            warmup: int, iters: int) -> dict[str, Any]:
    """fwd, bwd, fwd+bwd times and fwd+bwd peak memory ('extra' excludes the input gradients it creates)."""
    def clear():
        for leaf in leaves:
            leaf.grad = None

    def fresh_forward():
        clear()
        return loss_fn()

    try:
        fwd = timeit(lambda _: loss_fn(), device=device, warmup=warmup, iters=iters)
        bwd = timeit(lambda loss: loss.backward(), setup=fresh_forward, device=device, warmup=warmup, iters=iters)
        both = timeit(lambda _: loss_fn().backward(), setup=clear, device=device, warmup=warmup, iters=iters)
        clear()
        free_memory()
        peak = peak_memory_bytes(lambda: loss_fn().backward(), device=device)
        grads = sum(leaf.numel() * leaf.element_size() for leaf in leaves)
        clear()
        result = {"fwd_ms": fwd["median_ms"], "bwd_ms": bwd["median_ms"], "fwd_bwd_ms": both["median_ms"],
                  "peak_mem_MB": peak / 2**20, "extra_mem_MB": max(0, peak - grads) / 2**20}
    except RuntimeError as exc:
        if not is_oom(exc):
            raise
        result = {"oom": True}
    clear()
    free_memory()
    return result


def run_method(name: str, method: Callable | str, make_loss: Callable[[Callable], Callable[[], torch.Tensor]],
               leaves: list[torch.Tensor], device: torch.device, warmup: int, iters: int) -> dict[str, Any]:
    """Measure one method; its loss value (taken first: Liger's in-place backward overwrites the logits) lets
    the report check that every method computes the same quantity."""
    if isinstance(method, str):
        return {"skipped": method}
    print(f"    {name}", flush=True)
    loss_fn = make_loss(method)
    try:
        value = float(loss_fn().detach())
    except RuntimeError as exc:
        if not is_oom(exc):
            raise
        free_memory()
        return {"oom": True}
    return {"loss": value, **measure(loss_fn, leaves, device, warmup, iters)}


def gemm_floor(n: int, hdim: int, vocab: int, dtype, device, warmup: int, iters: int) -> dict[str, float] | dict:
    """cuBLAS (torch.matmul) time of the GEMMs any exact method must do: logits, and backward's dH and dW."""
    try:
        h = torch.randn(n, hdim, dtype=dtype, device=device)
        w = torch.randn(vocab, hdim, dtype=dtype, device=device)
        dz = torch.randn(n, vocab, dtype=dtype, device=device)
        logits = timeit(lambda _: h @ w.T, device=device, warmup=warmup, iters=iters)["median_ms"]
        d_h = timeit(lambda _: dz @ w, device=device, warmup=warmup, iters=iters)["median_ms"]
        d_w = timeit(lambda _: dz.T @ h, device=device, warmup=warmup, iters=iters)["median_ms"]
        del h, w, dz
    except RuntimeError as exc:
        if not is_oom(exc):
            raise
        return {"oom": True}
    finally:
        free_memory()
    fwd_bwd = 2 * logits + d_h + d_w  # forward logits, recomputed logits, dH, dW
    return {"fwd_ms": logits, "fwd_bwd_ms": fwd_bwd,
            "fwd_TFLOPs": 2 * n * hdim * vocab / logits / 1e9, "fwd_bwd_TFLOPs": 8 * n * hdim * vocab / fwd_bwd / 1e9}


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Device copy bandwidth in GB/s (bytes read + written), the practical ceiling for a streaming kernel."""
    x = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    y = torch.empty_like(x)
    ms = timeit(lambda _: y.copy_(x), device=device, warmup=2, iters=10)["median_ms"]
    del x, y
    free_memory()
    return 2 * nbytes / ms / 1e6


# ------------------------------------------------------------------ sections
def bench_linear(shapes, vocab, dtype, device, warmup, iters, compiled_ok: bool) -> list[dict]:
    rows = []
    gen = torch.Generator().manual_seed(0)
    methods = {"naive_torch": lambda h, w, t: naive_logprobs(h, w, t),
               "compiled_chunked_torch": make_compiled_chunked() if compiled_ok else "torch.compile disabled",
               "cce_filter_off": make_cce(device, None) if compiled_ok or device.type == "cuda"
               else "needs torch.compile",
               "cce_default_filter": make_cce(device, "high") if device.type == "cuda"
               else "CCE's filter exists only in its cce (GPU) implementation",
               "ours": ours_linear(True), "ours_logp_only": ours_linear(False),
               "ours_logp_only_filtered": ours_linear(False, CCE_FILTER_EPS)}
    for n, hdim in shapes:
        print(f"  linear N={n} H={hdim} V={vocab}", flush=True)
        h = (torch.randn(n, hdim, generator=gen) * 0.5).to(dtype).to(device).requires_grad_()
        w = (torch.randn(vocab, hdim, generator=gen) * 0.02).to(dtype).to(device).requires_grad_()
        t = torch.randint(0, vocab, (n,), generator=gen).to(device)
        row = {"N": n, "H": hdim, "V": vocab, "dtype": str(dtype).replace("torch.", ""),
               "naive_fp32_logits_MB": n * vocab * 4 / 2**20,
               "gemm_floor": gemm_floor(n, hdim, vocab, dtype, device, warmup, iters), "methods": {}}
        for name, method in methods.items():
            row["methods"][name] = run_method(name, method, lambda fn: (lambda: fn(h, w, t)), [h, w], device,
                                              warmup, iters)
        rows.append(row)
        del h, w, t
        free_memory()
    return rows


def bench_linear_grpo(shapes, vocab, seq_len, dtype, device, warmup, iters) -> list[dict]:
    rows = []
    gen = torch.Generator().manual_seed(1)
    liger = make_liger_chunked(device)
    for n, hdim in shapes:
        print(f"  linear_grpo N={n} H={hdim}", flush=True)
        h = (torch.randn(n, hdim, generator=gen) * 0.5).to(dtype).to(device).requires_grad_()
        w = (torch.randn(vocab, hdim, generator=gen) * 0.02).to(dtype).to(device).requires_grad_()
        t = torch.randint(0, vocab, (n,), generator=gen).to(device)
        g = grpo_batch(n, seq_len, device, gen)
        from srpo_fast.kernels import linear_token_logprobs

        def ours(hh, ww, tt, gg):
            return ours_grpo_tail(linear_token_logprobs(hh, ww, tt, return_entropy=False, check=False), gg)

        row = {"N": n, "H": hdim, "V": vocab, "seq_len": seq_len, "methods": {}}
        for name, method in {"liger_fused_linear_grpo": liger, "ours": ours}.items():
            row["methods"][name] = run_method(name, method, lambda fn: (lambda: fn(h, w, t, g)), [h, w], device,
                                              warmup, iters)
        rows.append(row)
        del h, w, t, g
        free_memory()
    return rows


def bench_token_logprobs(sizes, vocab, dtype, device, warmup, iters, copy_gbps: float) -> list[dict]:
    from srpo_fast.kernels import token_logprobs

    def ours(logits, targets):
        logp, ent = token_logprobs(logits, targets, check=False)
        return logp.sum() - 0.5 * ent.sum()

    rows = []
    gen = torch.Generator().manual_seed(2)
    for n in sizes:
        print(f"  token_logprobs N={n} V={vocab}", flush=True)
        try:
            logits = (torch.randn(n, vocab, generator=gen) * 2).to(dtype).to(device).requires_grad_()
        except RuntimeError as exc:
            if not is_oom(exc):
                raise
            rows.append({"N": n, "V": vocab, "oom": True})
            continue
        t = torch.randint(0, vocab, (n,), generator=gen).to(device)
        row = {"N": n, "V": vocab, "dtype": str(dtype).replace("torch.", ""), "methods": {}}
        for name, method in {"naive_torch": naive_from_logits, "ours": ours}.items():
            row["methods"][name] = run_method(name, method, lambda fn: (lambda: fn(logits, t)), [logits], device,
                                              warmup, iters)
        mine = row["methods"]["ours"]
        if "fwd_ms" in mine:
            elem = logits.element_size()
            fwd_gbps = n * vocab * elem / mine["fwd_ms"] / 1e6
            bwd_gbps = 2 * n * vocab * elem / mine["bwd_ms"] / 1e6
            row["bandwidth"] = {"fwd_GBps": fwd_gbps, "bwd_GBps": bwd_gbps, "copy_GBps": copy_gbps,
                                "fwd_fraction": fwd_gbps / copy_gbps, "bwd_fraction": bwd_gbps / copy_gbps}
        rows.append(row)
        del logits, t
        free_memory()
    return rows


def bench_grpo_from_logits(sizes, vocab, seq_len, dtype, device, warmup, iters) -> list[dict]:
    from srpo_fast.kernels import token_logprobs

    liger = make_liger_triton(device)
    rows = []
    gen = torch.Generator().manual_seed(3)
    for n in sizes:
        print(f"  grpo_from_logits N={n}", flush=True)
        batch = n // seq_len
        g = grpo_batch(n, seq_len, device, gen)
        t = torch.randint(0, vocab, (n,), generator=gen).to(device)
        row = {"N": n, "V": vocab, "seq_len": seq_len, "methods": {}}
        try:
            # Liger reads [B, L+1, V] (it drops the last position); ours reads the packed [N, V] rows
            logits3d = (torch.randn(batch, seq_len + 1, vocab, generator=gen) * 2).to(dtype).to(device)
            logits3d.requires_grad_()
            logits2d = logits3d.detach()[:, :-1].reshape(n, vocab).clone().requires_grad_()
        except RuntimeError as exc:
            if not is_oom(exc):
                raise
            rows.append({**row, "oom": True})
            continue
        if isinstance(liger, str):
            row["methods"]["liger_triton_grpo"] = {"skipped": liger}
        else:
            row["methods"]["liger_triton_grpo"] = run_method("liger_triton_grpo", liger,
                                                             lambda fn: (lambda: fn(logits3d, t, g)), [logits3d],
                                                             device, warmup, iters)

        def ours(logits, targets, gg):
            return ours_grpo_tail(token_logprobs(logits, targets, return_entropy=False, check=False), gg)

        row["methods"]["ours"] = run_method("ours", ours, lambda fn: (lambda: fn(logits2d, t, g)), [logits2d],
                                            device, warmup, iters)
        rows.append(row)
        del logits3d, logits2d
        free_memory()
    return rows


# ------------------------------------------------------------------ performance model (no GPU needed)
GPUS = {  # dense bf16 tensor-core peak, HBM bandwidth, SMs, boost clock
    "H100": dict(tflops=989.4, tbps=3.35, sms=132, ghz=1.98),
    "H200": dict(tflops=989.4, tbps=4.8, sms=132, ghz=1.98),
}
ISSUE_PER_CLK = 4      # warp instructions issued per clock per SM (4 schedulers)
MUFU_PER_CLK = 0.5     # warp MUFU instructions (ex2, lg2, rcp) per clock per SM (16 lanes)
MODEL_SHAPES = [(16384, 2048, 151_936), (16384, 2048, VOCAB), (16384, 3584, VOCAB), (16384, 5120, VOCAB)]
SASS_TABLE = Path(__file__).resolve().parent / "results" / "compile" / "compile_check.json"
CONFIG_RE = re.compile(r"BN(\d+)_BV(\d+)_BH(\d+)_w(\d+)_s(\d+)")


def kernel_costs(n: int, hdim: int, vocab: int, elem: int = 2) -> dict[str, dict]:
    """FLOPs and compulsory HBM bytes of each kernel at one shape (bf16 inputs, fp32 statistics); the linear
    op's backward is its dz kernel plus two cuBLAS GEMMs per vocab chunk."""
    from srpo_fast.kernels.linear_logprobs import backward_chunk

    chunks = -(-vocab // backward_chunk(hdim, vocab, elem))
    gemm = 2 * n * hdim * vocab
    return {
        "token_logprobs_fwd": dict(flops=6 * n * vocab, bytes=n * vocab * elem + 16 * n),
        "token_logprobs_bwd": dict(flops=8 * n * vocab, bytes=2 * n * vocab * elem + 24 * n),
        "linear_fwd": dict(flops=gemm, bytes=(n + vocab) * hdim * elem + 24 * n),
        "linear_dz": dict(flops=gemm, bytes=(n + vocab) * hdim * elem + n * vocab * elem + 28 * n),
        # d_hidden (+)= dz_c @ W_c: dz and W read once; the fp32 accumulator written once, then read+written
        "linear_dhidden_gemm": dict(flops=gemm, bytes=n * vocab * elem + vocab * hdim * elem
                                    + (2 * chunks - 1) * 4 * n * hdim),
        "linear_dweight_gemm": dict(flops=gemm, bytes=n * vocab * elem + (n + vocab) * hdim * elem),
        "grpo_loss": dict(flops=60 * n, bytes=4 * 9 * n),
    }


def roofline_ms(flops: float, nbytes: float, gpu: dict) -> tuple[float, str]:
    t_compute = flops / (gpu["tflops"] * 1e12) * 1e3
    t_memory = nbytes / (gpu["tbps"] * 1e12) * 1e3
    return max(t_compute, t_memory), ("compute" if t_compute >= t_memory else "memory")


def _issue_ms(warp_instr: float, mufu_warp_instr: float, gpu: dict) -> float:
    clocks = max(warp_instr / ISSUE_PER_CLK, mufu_warp_instr / MUFU_PER_CLK) / gpu["sms"]
    return clocks / (gpu["ghz"] * 1e9) * 1e3


def linear_sass_model(kind: str, rec: dict, n: int, hdim: int, vocab: int) -> dict | None:
    """Instruction-issue time of one linear kernel launch from its compiled SASS (a compile-check record).

    The K-loop is the innermost SASS loop (no MUFU in it); for the forward the vocab-tile loop is the smallest
    loop holding MUFU (ex2), and its body minus the K-loop is the softmax epilogue of one tile. Per program:
    fwd = tiles x (K steps x K-loop + epilogue) + the rest once; dz = K steps x K-loop + the rest (epilogue,
    stores) once. With one CTA per SM
    the epilogue cannot overlap another CTA's tensor-core work, so it adds to the GEMM time (``expected``)."""
    from srpo_fast.kernels.linear_logprobs import num_splits

    m = CONFIG_RE.search(rec["name"])
    loops = rec.get("loops") or []
    k_loops = [lp["instr"] for lp in loops  # the K-loop: tensor-core work, no ex2
               if (lp.get("HGMMA") or lp.get("HMMA")) and not lp.get("MUFU")]
    tile_loops = [lp["instr"] for lp in loops if lp.get("MUFU")]  # a loop holding the softmax epilogue
    if not m or not k_loops or (kind == "fwd" and not tile_loops):
        return None
    loops = [min(k_loops)] + ([min(tile_loops)] if kind == "fwd" else [])
    bn, bv, bh, warps, _ = (int(x) for x in m.groups())
    k_steps, row_blocks, tiles = -(-hdim // bh), -(-n // bn), -(-vocab // bv)
    total = rec["sass_total"]
    if kind == "fwd":
        splits = num_splits(n, vocab, GPUS["H100"]["sms"])
        epilogue = loops[1] - loops[0]
        programs = row_blocks * splits
        per_program = tiles / splits * (k_steps * loops[0] + epilogue) + total - loops[1]
    else:
        epilogue = total - loops[0]
        programs = row_blocks * tiles
        per_program = k_steps * loops[0] + epilogue
    mufu = row_blocks * tiles * (bn * bv // 32)  # one ex2 per logit, in warp instructions
    epilogue_warp_instr = row_blocks * tiles * warps * epilogue
    out = {"config": rec["name"], "regs": rec.get("regs"), "spill_bytes": rec.get("spill_bytes"),
           "ctas_per_sm": rec.get("ctas_per_sm"), "k_loop_instr": loops[0], "epilogue_instr": epilogue,
           "epilogue_instr_per_logit": round(epilogue * 32 * warps / (bn * bv), 2),
           "warp_instr": programs * warps * per_program}
    for gname, gpu in GPUS.items():
        issue = _issue_ms(out["warp_instr"], mufu, gpu)
        epi = _issue_ms(epilogue_warp_instr, mufu, gpu)
        gemm = roofline_ms(2 * n * hdim * vocab, 0, gpu)[0]
        out[f"instr_bound_ms_{gname}"] = issue
        out[f"expected_ms_{gname}"] = gemm + epi if (rec.get("ctas_per_sm") or 1) < 2 else max(gemm, issue)
    return out


def streaming_sass_model(rec: dict, elements: int) -> dict:
    """Issue time of a streaming kernel: SASS instructions per element of its steady loop x elements."""
    per_elem = rec["sass_per_elem"]
    out = {"config": rec["name"], "regs": rec.get("regs"), "sass_per_elem": per_elem}
    for gname, gpu in GPUS.items():
        out[f"instr_bound_ms_{gname}"] = _issue_ms(per_elem * elements / 32, 0, gpu)
    return out


def load_sass_table(path: Path | None) -> list[dict]:
    """sm_90 records of the kernel compile check (``python -m srpo_fast.kernels.compile_check --json F``)."""
    if path is None or not Path(path).is_file():
        return []
    data = json.loads(Path(path).read_text())
    return [r for r in data.get("records", []) if r.get("ok") and r.get("arch") == 90]


def _pick(records: list[dict], op: str, prefix: str, exclude=("bias=1", "filter=1", "fp32", "fp16")) -> list[dict]:
    return [r for r in records if r.get("op") == op and r["name"].startswith(prefix)
            and not any(x in r["name"] for x in exclude)]


def performance_model(sass_records: list[dict], measured: dict | None = None) -> list[dict]:
    """Per kernel and shape: FLOPs, bytes, the roofline time on H100 and H200 (and what bounds it); with the
    compile check's SASS, the instruction-issue time of each selectable config (linear kernels) or of the
    steady loop (streaming kernels); the measured time beside them when ``measured[(kernel, N, H, V)]`` has it."""
    rows, seen = [], set()
    for n, hdim, vocab in MODEL_SHAPES:
        for name, cost in kernel_costs(n, hdim, vocab).items():
            if not name.startswith("linear"):  # H plays no part: one row per (N, V)
                if (name, n, vocab) in seen:
                    continue
                seen.add((name, n, vocab))
            row = {"kernel": name, "N": n, "H": hdim, "V": vocab, "GFLOP": cost["flops"] / 1e9,
                   "GB": cost["bytes"] / 1e9, "flop_per_byte": cost["flops"] / cost["bytes"]}
            for gname, gpu in GPUS.items():
                row[f"roofline_ms_{gname}"], row[f"bound_{gname}"] = roofline_ms(cost["flops"], cost["bytes"], gpu)
            sass = []
            if name in ("linear_fwd", "linear_dz"):
                kind = name.split("_")[1]
                sass = [x for x in (linear_sass_model(kind, r, n, hdim, vocab)
                                    for r in _pick(sass_records, "linear_logprobs", kind + "[")) if x]
            elif name.startswith("token_logprobs"):
                sass = [streaming_sass_model(r, n * vocab) for r in _pick(sass_records, "token_logprobs",
                                                                          name.rsplit("_", 1)[1] + "[")
                        if r.get("sass_per_elem")]
            elif name == "grpo_loss":
                sass = [streaming_sass_model(r, n) for r in _pick(sass_records, "grpo_loss", "")
                        if r.get("sass_per_elem")]
            if sass:
                # linear: the fastest config first (the autotuner's best case); streaming: the costliest variant
                # first (all features on), as that is the one the trainer runs
                row["sass"] = sorted(sass, key=lambda x: x.get("expected_ms_H100", x["instr_bound_ms_H100"]),
                                     reverse="k_loop_instr" not in sass[0])
            elif name not in ("linear_dhidden_gemm", "linear_dweight_gemm"):
                row["sass_note"] = "no compile-check record (python -m srpo_fast.kernels.compile_check --json)"
            key = (name, n, hdim, vocab)
            if measured and key in measured:
                row["measured_ms"] = measured[key]
                row["measured_over_roofline_H100"] = measured[key] / row["roofline_ms_H100"]
            rows.append(row)
    return rows


def measured_for_model(results: dict) -> dict:
    """Map the GPU measurements onto model rows: our linear op's forward = linear_fwd (+ gather, merge),
    its backward = dz + both GEMMs (recorded on the dz row as the sum of the three); token_logprobs fwd/bwd."""
    out = {}
    for row in results.get("linear_logprobs", []):
        ours = row["methods"].get("ours", {})
        if "fwd_ms" in ours:
            out[("linear_fwd", row["N"], row["H"], row["V"])] = ours["fwd_ms"]
            out[("linear_dz", row["N"], row["H"], row["V"])] = ours["bwd_ms"]
    for row in results.get("token_logprobs", []):
        ours = row.get("methods", {}).get("ours", {})
        if "fwd_ms" in ours:
            for h in {s[1] for s in MODEL_SHAPES}:  # the model keeps the first H of each (N, V)
                out[("token_logprobs_fwd", row["N"], h, row["V"])] = ours["fwd_ms"]
                out[("token_logprobs_bwd", row["N"], h, row["V"])] = ours["bwd_ms"]
    return out


def model_markdown(rows: list[dict]) -> str:
    lines = ["Roofline: H100 989 TFLOP/s bf16 dense, 3.35 TB/s; H200 989 TFLOP/s, 4.8 TB/s. Instruction bound: "
             f"SASS warp instructions / ({ISSUE_PER_CLK} per clock per SM x 132 SMs x 1.98 GHz), MUFU at "
             f"{MUFU_PER_CLK}/clock/SM. 'expected' adds the softmax epilogue to the GEMM time when one CTA fills "
             "an SM (it cannot hide behind another CTA's tensor-core work). The backward measured time sits on "
             "the linear_dz row and covers dz + both GEMMs.", "",
             "| kernel | N | H | V | GFLOP | GB | roofline ms H100 (bound) | roofline ms H200 | SASS (linear: best "
             "config, regs, K-loop / epilogue instr, epilogue instr per logit; streaming: costliest variant) | "
             "instr-bound ms H100 | expected ms "
             "H100 | measured ms |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        best = (r.get("sass") or [None])[0]
        if best and "k_loop_instr" in best:
            desc = (f"{best['config']}: {best['regs']} regs, {best['k_loop_instr']} / {best['epilogue_instr']}, "
                    f"{best['epilogue_instr_per_logit']}")
        elif best:
            desc = f"{best['config']}: {best['regs']} regs, {best['sass_per_elem']} instr/element"
        else:
            desc = r.get("sass_note", "cuBLAS")
        ib = f"{best['instr_bound_ms_H100']:.3f}" if best else "-"
        ex = f"{best['expected_ms_H100']:.3f}" if best and "expected_ms_H100" in best else "-"
        meas = f"{r['measured_ms']:.3f}" if "measured_ms" in r else "no GPU"
        lines.append(f"| {r['kernel']} | {r['N']} | {r['H']} | {r['V']} | {r['GFLOP']:.1f} | {r['GB']:.3f} | "
                     f"{r['roofline_ms_H100']:.3f} ({r['bound_H100']}) | {r['roofline_ms_H200']:.3f} | {desc} | "
                     f"{ib} | {ex} | {meas} |")
    return "\n".join(lines) + "\n"


def compile_sass_table(out: Path) -> Path | None:
    """Run the kernel compile check (sm_90, every op) into ``out``; None when this checkout has no compile check
    or it fails (the model then reports rooflines only)."""
    if importlib.util.find_spec("srpo_fast.kernels.compile_check") is None:
        return None
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "srpo_fast.kernels.compile_check", "--arch", "90", "--json",
                           str(out)], env=env, capture_output=True, text=True)
    return out if out.is_file() else (print(proc.stdout[-2000:], proc.stderr[-2000:]) or None)


# ------------------------------------------------------------------ targets and report
def evaluate_targets(results: dict) -> dict[str, dict]:
    values: dict[str, dict[str, float]] = {name: {} for name in TARGETS}
    for row in results["linear_logprobs"]:
        key, m, floor = f"N={row['N']},H={row['H']}", row["methods"], row["gemm_floor"]
        ours, mine_lp = m.get("ours", {}), m.get("ours_logp_only", {})
        if "fwd_bwd_ms" in ours and "fwd_bwd_ms" in floor:
            values["linear_fwd_bwd_over_gemm_floor"][key] = ours["fwd_bwd_ms"] / floor["fwd_bwd_ms"]
        if "fwd_bwd_ms" in mine_lp and "fwd_bwd_ms" in m.get("cce_filter_off", {}):
            values["linear_speedup_vs_cce"][key] = m["cce_filter_off"]["fwd_bwd_ms"] / mine_lp["fwd_bwd_ms"]
        filt = m.get("ours_logp_only_filtered", {})
        if "fwd_bwd_ms" in filt and "fwd_bwd_ms" in m.get("cce_default_filter", {}):
            values["linear_filtered_speedup_vs_cce_default"][key] = (m["cce_default_filter"]["fwd_bwd_ms"]
                                                                     / filt["fwd_bwd_ms"])
        if "extra_mem_MB" in ours:
            values["linear_extra_memory_fraction_of_fp32_logits"][key] = (ours["extra_mem_MB"]
                                                                         / row["naive_fp32_logits_MB"])
    for row in results["linear_grpo"]:
        m = row["methods"]
        if "fwd_bwd_ms" in m.get("ours", {}) and "fwd_bwd_ms" in m.get("liger_fused_linear_grpo", {}):
            values["linear_grpo_speedup_vs_liger_chunked"][f"N={row['N']},H={row['H']}"] = (
                m["liger_fused_linear_grpo"]["fwd_bwd_ms"] / m["ours"]["fwd_bwd_ms"])
    for row in results["token_logprobs"]:
        if "bandwidth" in row:
            bw = row["bandwidth"]
            values["token_logprobs_fraction_of_copy_bandwidth"][f"N={row['N']}"] = min(bw["fwd_fraction"],
                                                                                       bw["bwd_fraction"])
    report = {}
    for name, (op, threshold) in TARGETS.items():
        vals = values[name]
        ok = [v <= threshold if op == "<=" else v >= threshold for v in vals.values()]
        report[name] = {"target": f"{op} {threshold}", "values": vals, "met": all(ok) if ok else None}
    return report


def plot(results: dict, path: Path) -> Path | None:
    time_panel, mem_panel = {}, {}
    for row in results["linear_logprobs"]:
        key = f"N={row['N']} H={row['H']}"
        time_panel[key] = {k: v["fwd_bwd_ms"] for k, v in row["methods"].items() if "fwd_bwd_ms" in v}
        if "fwd_bwd_ms" in row["gemm_floor"]:
            time_panel[key]["cublas_floor"] = row["gemm_floor"]["fwd_bwd_ms"]
        mem_panel[key] = {k: v["peak_mem_MB"] for k, v in row["methods"].items() if "peak_mem_MB" in v}
    grpo_panel = {f"N={r['N']} H={r['H']}": {k: v["fwd_bwd_ms"] for k, v in r["methods"].items()
                                             if "fwd_bwd_ms" in v} for r in results["linear_grpo"]}
    return plot_bars(path, [("linear log-prob + entropy, fwd+bwd", "ms", time_panel),
                            ("linear log-prob, fwd+bwd peak memory", "MB", mem_panel),
                            ("GRPO loss from hidden states, fwd+bwd", "ms", grpo_panel)])


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny CPU shapes, torch paths; for tests")
    parser.add_argument("--out", type=Path, default=None, help="results JSON path")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile-based peers")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated subset of {','.join(SECTIONS)} (the others are recorded as empty)")
    parser.add_argument("--iters", type=int, default=None, help="timed iterations per measurement")
    parser.add_argument("--model-only", action="store_true",
                        help="only the performance model (no device needed): results/kernels_model.{json,md}")
    parser.add_argument("--sass-table", type=Path, default=SASS_TABLE,
                        help="compile-check JSON the model reads SASS from (default: the committed table)")
    parser.add_argument("--compile-sass", action="store_true",
                        help="run the compile check (sm_90) for the model instead of reading --sass-table")
    args = parser.parse_args(argv)
    if args.model_only:
        return write_model(args, {}, "kernels_model", args.out)
    sections = set(args.sections.split(","))
    if not sections <= set(SECTIONS):
        parser.error(f"unknown sections: {sorted(sections - set(SECTIONS))}")

    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # Liger's Triton GRPO kernel can then run on CPU
        device, dtype, vocab, seq_len, warmup, iters = torch.device("cpu"), torch.float32, 1001, 16, 1, 2
        linear_shapes, token_sizes = [(64, 32), (48, 24)], [64]
        name = "kernels_smoke"
    else:
        if not torch.cuda.is_available():
            parser.error("the full benchmark needs CUDA; use --smoke on CPU")
        device, dtype, vocab, seq_len, warmup, iters = torch.device("cuda"), torch.bfloat16, VOCAB, SEQ_LEN, 2, 5
        linear_shapes = [(n, h) for n in (4096, 16384, 32768) for h in (2048, 3584, 5120)]
        token_sizes = [4096, 16384, 32768]
        name = "kernels"
    compiled_ok = not args.no_compile
    iters = args.iters or iters
    copy_gbps = copy_bandwidth(device, (1 << 30) if device.type == "cuda" else (1 << 24))
    print(f"device copy bandwidth {copy_gbps:.0f} GB/s", flush=True)
    results: dict[str, Any] = {"smoke": args.smoke, "copy_bandwidth_GBps": copy_gbps}
    runners = {
        "linear_logprobs": lambda: bench_linear(linear_shapes, vocab, dtype, device, warmup, iters, compiled_ok),
        "linear_grpo": lambda: bench_linear_grpo(linear_shapes, vocab, seq_len, dtype, device, warmup, iters),
        "token_logprobs": lambda: bench_token_logprobs(token_sizes, vocab, dtype, device, warmup, iters, copy_gbps),
        "grpo_from_logits": lambda: bench_grpo_from_logits(token_sizes[:2], vocab, seq_len, dtype, device, warmup,
                                                           iters),
    }
    for section, run in runners.items():
        results[section] = run() if section in sections else []
    results["targets"] = evaluate_targets(results)
    path = write_results(name, results, args.out)
    write_model(args, measured_for_model(results), name + "_model", path.with_name(path.stem + "_model.json"))
    png = plot(results, path.with_suffix(".png"))
    print(f"wrote {path}" + (f" and {png}" if png else ""))
    for target, rec in results["targets"].items():
        print(f"  {target}: {rec['target']} -> met={rec['met']} {rec['values']}")
    return path


def write_model(args, measured: dict, name: str, out: Path | None) -> Path:
    """The performance model beside the measurements (if any): JSON and a markdown table."""
    table = args.sass_table
    if args.compile_sass or (not args.smoke and not Path(table).is_file()):
        import tempfile

        table = compile_sass_table(Path(tempfile.mkdtemp(prefix="sass_")) / "compile_check.json")
    records = load_sass_table(table)
    rows = performance_model(records, measured)
    path = write_results(name, {"sass_source": ("compile check (python -m srpo_fast.kernels.compile_check), sm_90, "
                                                f"{len(records)} variant records") if records else None, "gpus": GPUS,
                                "issue_per_clock": ISSUE_PER_CLK, "mufu_per_clock": MUFU_PER_CLK, "rows": rows},
                         out)
    md = model_markdown(rows)
    path.with_suffix(".md").write_text(f"# Kernel performance model ({name})\n\n" + md)
    print(md)
    return path


if __name__ == "__main__":
    main()
