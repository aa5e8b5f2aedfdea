"""The CPU-offload optimizer step: torch's AdamW (single-tensor, foreach, fused) vs DeepSpeed's CPU Adam op.

A flat fp32 parameter set (what one rank holds under FSDP2 CPU offload: master weights, gradients, two moments, all
in host memory) gets `--steps` timed AdamW steps per implementation, each from the same start and gradients. Reported
per size and implementation: the median step time, the memory bandwidth it reached (the four fp32 arrays read and
three written once per step: 28 bytes per parameter), how far its final parameters and moments are from a float64
AdamW (on a 4M-element sample), and how far its parameters are from torch's single-tensor AdamW (the path
train.offload_optimizer=torch takes on CPU), in units of fp32 rounding at the weights' scale.
Thread scaling: torch's single-tensor path at 1 thread vs all, to see whether it is single-threaded.

  python benchmarks/cpu_adam.py --params 100e6 250e6      # writes benchmarks/results/cpu/cpu_adam.json
  python benchmarks/cpu_adam.py --smoke                   # 1M parameters, two steps
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import RESULTS_DIR, plot_bars, write_results  # noqa: E402

LR, BETAS, EPS, WEIGHT_DECAY = 1e-3, (0.9, 0.999), 1e-8, 0.01
BYTES_PER_PARAM = 28  # read param, grad, exp_avg, exp_avg_sq; write param, exp_avg, exp_avg_sq (fp32)
SAMPLE = 4_000_000  # elements compared with the float64 reference


def torch_adamw(**kwargs) -> Callable[[list[torch.Tensor]], torch.optim.Optimizer]:
    return lambda params: torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY, **kwargs)


def deepspeed_adamw(params: list[torch.Tensor]) -> torch.optim.Optimizer:
    from srpo_fast.models.cpu_adam import DeepSpeedCPUAdamW

    return DeepSpeedCPUAdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)


def availability() -> dict[str, str | None]:
    """None where the implementation runs here, else why not."""
    why: dict[str, str | None] = {"torch_single": None, "torch_foreach": None, "torch_fused": None}
    try:
        torch.optim.AdamW([torch.zeros(2, requires_grad=True)], fused=True)
    except (RuntimeError, ValueError) as exc:
        why["torch_fused"] = f"{type(exc).__name__}: {exc}"
    try:
        from srpo_fast.models.cpu_adam import load_cpu_adam_op

        load_cpu_adam_op()
        why["deepspeed_cpu_adam"] = None
    except Exception as exc:  # noqa: BLE001 - the reason goes into the results
        why["deepspeed_cpu_adam"] = f"{type(exc).__name__}: {exc}"
    return why


BUILDERS = {"torch_single": torch_adamw(foreach=False, fused=False), "torch_foreach": torch_adamw(foreach=True),
            "torch_fused": torch_adamw(fused=True), "deepspeed_cpu_adam": deepspeed_adamw}


def make_set(numel: int, tensors: int, seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """`tensors` equal parameters adding up to `numel` (weights ~ N(0, 0.02)) and their fixed gradients."""
    gen = torch.Generator().manual_seed(seed)
    sizes = [numel // tensors + (i < numel % tensors) for i in range(tensors)]
    params = [(torch.randn(n, generator=gen) * 0.02) for n in sizes]
    grads = [(torch.randn(n, generator=gen) * 1e-3) for n in sizes]
    return params, grads


def run(name: str, numel: int, tensors: int, steps: int, warmup: int, threads: int) -> tuple[dict, tuple]:
    """Time `steps` optimizer steps after `warmup`; returns timings and the final (params, exp_avg, exp_avg_sq)."""
    torch.set_num_threads(threads)
    init, grads = make_set(numel, tensors, seed=0)
    params = [p.requires_grad_() for p in init]
    for p, g in zip(params, grads):
        p.grad = g
    optimizer = BUILDERS[name](params)
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        optimizer.step()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    state = [optimizer.state[p] for p in params]
    result = {"step_ms": median * 1e3, "min_ms": min(times) * 1e3, "threads": threads,
              "GB_per_s": BYTES_PER_PARAM * numel / median / 1e9}
    finals = [p.detach() for p in params], [s["exp_avg"] for s in state], [s["exp_avg_sq"] for s in state]
    del optimizer, state
    return result, finals


def ulps_at_scale(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest |x - ref| in units of fp32 rounding at the reference's scale (the ulp of max |ref|): rounding-level
    agreement reads as a few units, whatever the elements near zero do."""
    top = ref.abs().max().float()
    ulp = float(torch.nextafter(top, torch.tensor(float("inf"))) - top)
    worst = max(float((a.double() - b.double()).abs().max()) for a, b in zip(x.split(1 << 24), ref.split(1 << 24)))
    return worst / ulp


def max_rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest elementwise relative error (for the second moment: a sum of squares, no cancellation)."""
    ref = ref.double()
    return float(((x.double() - ref).abs() / ref.abs().clamp_min(1e-300)).max())


def fp64_reference(numel: int, tensors: int, steps: int) -> tuple[torch.Tensor, ...]:
    """torch's AdamW in float64 on the first SAMPLE elements of the first tensor: the exact answer to compare with
    (the update is elementwise, so a prefix of the set is a set of its own)."""
    init, grads = make_set(numel, tensors, seed=0)
    p = init[0][:SAMPLE].double().requires_grad_()
    p.grad = grads[0][:SAMPLE].double()
    del init, grads
    optimizer = torch.optim.AdamW([p], lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY, foreach=False)
    for _ in range(steps):
        optimizer.step()
    state = optimizer.state[p]
    return p.detach(), state["exp_avg"], state["exp_avg_sq"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=float, nargs="+", default=[100e6], help="parameter counts to run")
    parser.add_argument("--tensors", type=int, default=1, help="split each set into this many equal tensors")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--smoke", action="store_true", help="1M parameters, 2 steps")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.smoke:
        args.params, args.steps, args.warmup = [1e6], 2, 1
    threads = torch.get_num_threads()
    why_not = availability()
    sizes = {}
    for count in args.params:
        numel = int(count)
        print(f"{numel / 1e6:.0f}M parameters in {args.tensors} tensor(s), {threads} threads", flush=True)
        rows: dict[str, dict] = {}
        exact = fp64_reference(numel, args.tensors, args.warmup + args.steps)
        ref = None
        for name, reason in why_not.items():
            if reason is not None:
                rows[name] = {"skipped": reason}
                continue
            row, final = run(name, numel, args.tensors, args.steps, args.warmup, threads)
            sample = [t[0][:SAMPLE] for t in final]
            row["vs_fp64"] = {"params_ulps_at_scale": ulps_at_scale(sample[0], exact[0]),
                              "exp_avg_ulps_at_scale": ulps_at_scale(sample[1], exact[1]),
                              "exp_avg_sq_max_rel": max_rel(sample[2], exact[2])}
            if ref is None:  # torch_single runs first: what train.offload_optimizer=torch does on CPU
                ref = final[0]
            else:
                row["params_vs_torch_single"] = {
                    "ulps_at_scale": max(ulps_at_scale(x, y) for x, y in zip(final[0], ref)),
                    "frac_differ": sum(int((x != y).sum()) for x, y in zip(final[0], ref)) / numel}
            rows[name] = row
            print(f"  {name:20s} {row['step_ms']:9.1f} ms  {row['GB_per_s']:6.1f} GB/s  vs fp64 {row['vs_fp64']}  "
                  f"vs torch_single {row.get('params_vs_torch_single', '-')}", flush=True)
            del final, sample
            gc.collect()
        if threads > 1 and not args.smoke:
            single, _ = run("torch_single", numel, args.tensors, args.steps, args.warmup, 1)
            rows["torch_single_1_thread"] = single
            print(f"  {'torch_single @1 thr':20s} {single['step_ms']:9.1f} ms", flush=True)
            torch.set_num_threads(threads)
        del ref, exact
        gc.collect()
        sizes[f"{numel / 1e6:.0f}M"] = rows
    name = "cpu_adam_smoke" if args.smoke else "cpu_adam"
    out = args.out if args.out is not None else RESULTS_DIR / "cpu" / f"{name}.json"
    data = {"config": {"lr": LR, "betas": BETAS, "eps": EPS, "weight_decay": WEIGHT_DECAY, "steps": args.steps,
                       "warmup": args.warmup, "tensors": args.tensors, "threads": threads,
                       "steps_timed": "median of --steps after --warmup"},
            "sizes": sizes}
    path = write_results(name, data, out)
    plot_bars(path.with_suffix(".png"), [("AdamW step time (lower is better)", "ms",
                                          {size: {k: v["step_ms"] for k, v in rows.items() if "step_ms" in v}
                                           for size, rows in sizes.items()})])
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
