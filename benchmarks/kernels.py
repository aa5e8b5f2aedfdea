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
import os
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
SEQ_LEN = 512  # tokens per sequence in the GRPO sections
SECTIONS = ("linear_logprobs", "linear_grpo", "token_logprobs", "grpo_from_logits")
TARGETS = {
    "linear_fwd_bwd_over_gemm_floor": ("<=", 1.15),
    "linear_grpo_speedup_vs_liger_chunked": (">=", 1.5),
    "linear_speedup_vs_cce": (">=", 1.2),
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


def make_cce(device: torch.device) -> Callable | str:
    try:
        from cut_cross_entropy import linear_cross_entropy
    except ImportError:
        return "cut-cross-entropy not installed"
    impl = "cce" if device.type == "cuda" else "torch_compile"
    return lambda h, w, t: -linear_cross_entropy(h, w, t, reduction="none", impl=impl).sum()


def ours_linear(with_entropy: bool) -> Callable:
    from srpo_fast.kernels import linear_token_logprobs

    def run(hidden, weight, targets):
        out = linear_token_logprobs(hidden, weight, targets, return_entropy=with_entropy, check=False)
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
               "cce_logp_only": make_cce(device) if compiled_ok or device.type == "cuda" else "needs torch.compile",
               "ours": ours_linear(True), "ours_logp_only": ours_linear(False)}
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


# ------------------------------------------------------------------ targets and report
def evaluate_targets(results: dict) -> dict[str, dict]:
    values: dict[str, dict[str, float]] = {name: {} for name in TARGETS}
    for row in results["linear_logprobs"]:
        key, m, floor = f"N={row['N']},H={row['H']}", row["methods"], row["gemm_floor"]
        ours, mine_lp = m.get("ours", {}), m.get("ours_logp_only", {})
        if "fwd_bwd_ms" in ours and "fwd_bwd_ms" in floor:
            values["linear_fwd_bwd_over_gemm_floor"][key] = ours["fwd_bwd_ms"] / floor["fwd_bwd_ms"]
        if "fwd_bwd_ms" in mine_lp and "fwd_bwd_ms" in m.get("cce_logp_only", {}):
            values["linear_speedup_vs_cce"][key] = m["cce_logp_only"]["fwd_bwd_ms"] / mine_lp["fwd_bwd_ms"]
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
    args = parser.parse_args(argv)
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
    png = plot(results, path.with_suffix(".png"))
    print(f"wrote {path}" + (f" and {png}" if png else ""))
    for target, rec in results["targets"].items():
        print(f"  {target}: {rec['target']} -> met={rec['met']} {rec['values']}")
    return path


if __name__ == "__main__":
    main()
