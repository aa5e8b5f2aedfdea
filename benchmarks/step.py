"""One training step's forward+backward: packed rows (varlen attention) vs right-padded micro-batches.

Both variants see the same samples (a GRPO-like length mix: prompts uniform 200-1000 tokens, responses lognormal,
median ~450, clipped to 100-2048) under the same token budget per micro-batch, and both score the response tokens
with `linear_token_logprobs` (no [N, V] logits), so the only difference is padding and attention:
  packed  rows planned by best-fit decreasing (data/packing.py), `srpo_varlen` attention (flash-attn / torch varlen
          on CUDA), models/forward.packed_token_logprobs
  padded  samples in their given order, right-padded to the longest of each micro-batch while B x longest stays in
          the budget; transformers' SDPA attention, causal with no mask (right padding never reaches a real token)
Reported per variant: step time, real tokens/s, peak memory, micro-batches, and MFU = model FLOPs / time / peak,
model FLOPs = 6 x (non-embedding params) x real tokens + 6 x V x H x response tokens (LM head) + attention
6 x layers x H x sum(L_i^2) (causal), gradient-checkpointing recompute not counted; peak 989 TFLOP/s (H100/H200
bf16 dense) unless --peak-tflops is given. Padding waste avoided = padded tokens the padded run computes on.

  python benchmarks/step.py                       # CUDA: Qwen2.5-VL-3B / 7B text shapes, random bf16 weights, GC on
  python benchmarks/step.py --smoke --out X.json  # CPU: the tiny kit's text model (what the test runs)
  python benchmarks/step.py --scaling             # CPU: tiny text model, full-length mix, 2k -> 32k real tokens
The scaling run reports cost per real token (us) per step size for both variants, and its spread (largest / smallest
across sizes): a packed path that grows super-linearly with the step size shows there, not in one number. Its sizes
are timed in interleaved rounds (drift of a shared machine hits every size alike), short steps several times per
round; it also reports the cost per model GFLOP, which takes out attention's larger share in a mix of longer
sequences (not the cost of the log-prob path per response token), and the mix itself (sum L^2 / sum L, response share).
"""
from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import free_memory, is_oom, peak_memory_bytes, plot_bars, timeit, write_results  # noqa: E402
from srpo_fast.data.packing import Sample  # noqa: E402
from srpo_fast.kernels import linear_token_logprobs  # noqa: E402
from srpo_fast.models import (backbone, output_head, packed_token_logprobs, register_varlen_attention,  # noqa: E402
                              varlen_backend)
from srpo_fast.train.batches import pack_planned, plan_rank_microbatches  # noqa: E402

H100_BF16_DENSE_TFLOPS = 989.0
# CPU step timing: wall time, or the process's CPU time (--clock cpu: the work itself, what a shared, oversubscribed
# machine cannot inflate; with one thread (OMP_NUM_THREADS=1) it is the single core's compute time)
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
CLOCK = "wall"
# Qwen2.5-VL-3B/7B-Instruct language-model shapes (config.json of the released models)
CONFIGS = {
    "qwen2_5_vl_3b_text": dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                               num_attention_heads=16, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2_5_vl_7b_text": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                               num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False),
}


def sample_lengths(n: int, seed: int, scale: float = 1.0) -> list[tuple[int, int]]:
    """(prompt, response) token counts: prompts U[200, 1000], responses lognormal (median 450, sigma 0.8) clipped
    to [100, 2048]; all multiplied by `scale` (the smoke run shrinks them)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = rng.randint(200, 1000)
        response = min(2048, max(100, round(rng.lognormvariate(math.log(450), 0.8))))
        out.append((max(1, round(prompt * scale)), max(1, round(response * scale))))
    return out


def make_samples(lengths: list[tuple[int, int]], vocab: int, seed: int) -> list[Sample]:
    gen = torch.Generator().manual_seed(seed)
    return [Sample(torch.randint(0, vocab, (p,), generator=gen), torch.randint(0, vocab, (r,), generator=gen))
            for p, r in lengths]


def padded_microbatches(samples: list[Sample], max_tokens: int) -> list[list[int]]:
    """Consecutive samples while (count x longest) stays within the budget."""
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i, s in enumerate(samples):
        n = s.num_tokens
        if current and (len(current) + 1) * max(longest, n) > max_tokens:
            batches.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, n)
    if current:
        batches.append(current)
    return batches


def build_padded(samples: list[Sample], groups: list[list[int]], pad_id: int, device: torch.device) -> list[dict]:
    """Right-padded [B, Lmax] rows plus where each response token sits (row, position) and its id."""
    out = []
    for group in groups:
        longest = max(samples[i].num_tokens for i in group)
        ids = torch.full((len(group), longest), pad_id, dtype=torch.long)
        rows, positions, targets = [], [], []
        for b, i in enumerate(group):
            s = samples[i]
            seq = torch.cat([s.prompt_ids, s.response_ids])
            ids[b, :seq.numel()] = seq
            p, r = s.prompt_ids.numel(), s.response_ids.numel()
            rows.append(torch.full((r,), b))
            positions.append(torch.arange(p, p + r))
            targets.append(s.response_ids)
        out.append(dict(input_ids=ids.to(device), rows=torch.cat(rows).to(device),
                        positions=torch.cat(positions).to(device), targets=torch.cat(targets).to(device)))
    return out


def packed_step(model, batches, total_response_tokens: int) -> float:
    total = 0.0
    for batch in batches:
        logp = packed_token_logprobs(model, batch, sync_vision=False)
        loss = (logp * batch.loss_mask).sum() / total_response_tokens
        loss.backward()
        total += float(logp.detach().sum())
    return total


def padded_step(model, batches, total_response_tokens: int) -> float:
    inner = backbone(model)
    total = 0.0
    for batch in batches:
        hidden = inner(input_ids=batch["input_ids"], use_cache=False)[0]
        rows = hidden[batch["rows"], batch["positions"] - 1]
        weight, bias = output_head(model)
        logp = linear_token_logprobs(rows, weight, batch["targets"], return_entropy=False, bias=bias)
        (logp.sum() / total_response_tokens).backward()
        total += float(logp.detach().sum())
    return total


def model_flops(model, samples: list[Sample]) -> float:
    """Useful FLOPs of one forward+backward over `samples` (see the module docstring)."""
    cfg = model.config
    embed = model.get_input_embeddings().weight
    head = output_head(model)[0]
    body = sum(p.numel() for p in model.parameters()) - embed.numel() - (0 if head is embed else head.numel())
    tokens = sum(s.num_tokens for s in samples)
    responses = sum(s.response_ids.numel() for s in samples)
    square = sum(s.num_tokens ** 2 for s in samples)
    return (6.0 * body * tokens + 6.0 * head.numel() * responses
            + 6.0 * cfg.num_hidden_layers * cfg.hidden_size * square)


def set_attention(model, name: str) -> None:
    """Switch every attention module's implementation (they all read the shared config at call time)."""
    model.config._attn_implementation = name


def measure(label: str, step, setup, device, warmup: int, iters: int, flops: float, real_tokens: int,
            peak_flops: float | None) -> dict:
    try:
        logp_sum = step(setup())
        times = timeit(lambda arg: step(arg), device=device, setup=setup, warmup=max(0, warmup - 1), iters=iters,
                       clock=CLOCKS[CLOCK])
        peak = peak_memory_bytes(lambda: step(setup()), device=device)
    except RuntimeError as exc:
        if not is_oom(exc):
            raise
        free_memory()
        print(f"  {label}: out of memory", flush=True)
        return {"oom": True}
    seconds = times["median_ms"] / 1e3
    result = {"step_ms": times["median_ms"], "tokens_per_s": real_tokens / seconds, "peak_mem_GB": peak / 2 ** 30,
              "tflops": flops / seconds / 1e12, "mfu": flops / seconds / peak_flops if peak_flops else None,
              "logp_sum": logp_sum}
    mfu = f"{result['mfu'] * 100:5.1f}%" if result["mfu"] is not None else "  n/a"
    print(f"  {label:7s} {times['median_ms']:10.1f} ms  {result['tokens_per_s']:12.0f} tok/s  "
          f"{result['peak_mem_GB']:7.2f} GB  MFU {mfu}", flush=True)
    return result


def prepare_case(name: str, model, samples: list[Sample], max_tokens: int, device: torch.device) -> dict:
    """Both variants' micro-batches for `samples` (the trainer's packing plan for one rank; consecutive padded
    micro-batches), the useful FLOPs, and a description of the length mix."""
    real_tokens = sum(s.num_tokens for s in samples)
    responses = sum(s.response_ids.numel() for s in samples)
    plan = plan_rank_microbatches([s.num_tokens for s in samples], 1, max_tokens)  # the trainer's plan, one rank
    packed = [b.to(device) for b in pack_planned(plan.microbatches[0], samples.__getitem__)]
    padded = build_padded(samples, padded_microbatches(samples, max_tokens), pad_id=0, device=device)
    padded_tokens = sum(b["input_ids"].numel() for b in padded)
    print(f"{name}: {len(samples)} samples, {real_tokens} tokens ({responses} response), "
          f"{len(packed)} packed rows vs {len(padded)} padded micro-batches ({padded_tokens} padded tokens)",
          flush=True)
    # attention's work per token grows with the sequence length: sum(L^2) / sum(L) says how long the mix is
    mix = {"samples": len(samples), "length_weighted_mean_tokens": sum(s.num_tokens ** 2 for s in samples) /
           real_tokens, "response_fraction": responses / real_tokens}
    return dict(name=name, samples=samples, real_tokens=real_tokens, responses=responses, packed=packed,
                padded=padded, padded_tokens=padded_tokens, flops=model_flops(model, samples), mix=mix)


def case_steps(model, case: dict) -> dict:
    """variant -> (attention implementation, step function of no argument)."""
    return {"packed": (register_varlen_attention(), lambda: packed_step(model, case["packed"], case["responses"])),
            "padded": ("sdpa", lambda: padded_step(model, case["padded"], case["responses"]))}


def case_result(model, case: dict, result_packed: dict, result_padded: dict) -> dict:
    real_tokens, padded_tokens = case["real_tokens"], case["padded_tokens"]
    dtype = next(model.parameters()).dtype
    result_packed.update(microbatches=len(case["packed"]), row_tokens=[b.num_tokens for b in case["packed"]])
    result_padded.update(microbatches=len(case["padded"]), computed_tokens=padded_tokens,
                         padding_fraction=1 - real_tokens / padded_tokens)
    out = {"params": sum(p.numel() for p in model.parameters()), "dtype": str(dtype).replace("torch.", ""),
           "real_tokens": real_tokens, "response_tokens": case["responses"], "length_mix": case["mix"],
           "model_tflop_per_step": case["flops"] / 1e12,
           "attention_backend": varlen_backend(case["packed"][0].input_ids.device, dtype),
           "padding_waste_avoided": {"tokens": padded_tokens - real_tokens,
                                     "fraction_of_padded": 1 - real_tokens / padded_tokens},
           "packed": result_packed, "padded": result_padded}
    if "tokens_per_s" in result_packed and "tokens_per_s" in result_padded:
        out["speedup"] = result_packed["tokens_per_s"] / result_padded["tokens_per_s"]
        out["logp_sum_rel_diff"] = abs(result_packed["logp_sum"] - result_padded["logp_sum"]) / max(
            1.0, abs(result_padded["logp_sum"]))
    return out


def run_model(name: str, model, samples: list[Sample], max_tokens: int, device: torch.device, args,
              peak_flops: float | None) -> dict:
    case = prepare_case(name, model, samples, max_tokens, device)

    def zero():
        model.zero_grad(set_to_none=True)

    results = {}
    for variant, (attn, step) in case_steps(model, case).items():
        set_attention(model, attn)
        results[variant] = measure(variant, lambda _: step(), zero, device, args.warmup, args.iters, case["flops"],
                                   case["real_tokens"], peak_flops)
    model.zero_grad(set_to_none=True)
    return case_result(model, case, results["packed"], results["padded"])


def build_cuda_model(name: str, device: torch.device, seed: int):
    """Random-init Qwen2 LM with the named shapes, built directly on `device` in bf16 (transformers' own init, so
    buffers such as the rotary frequencies are real; meta + to_empty would leave them uninitialized)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**CONFIGS[name], max_position_embeddings=32768, rope_theta=1e6, use_cache=False)
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2ForCausalLM._from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def smoke(args) -> dict:
    from srpo_fast.models import load_policy
    from srpo_fast.tiny import ensure_tiny_kit

    device = torch.device("cpu")
    kit = ensure_tiny_kit(Path(tempfile.mkdtemp(prefix="step_kit_")), seed=0)
    model = load_policy(kit["text"], dtype=torch.float32, gradient_checkpointing=True)
    samples = make_samples(sample_lengths(args.samples or 12, args.seed, scale=0.05), 1152, args.seed)
    max_tokens = args.max_tokens or 256
    results = {"tiny_text": run_model("tiny_text", model, samples, max_tokens, device, args, None)}
    return {"smoke": True, "device": "cpu", "samples": len(samples), "max_tokens_per_microbatch": max_tokens,
            "results": results}


def samples_for(tokens: int, seed: int, vocab: int) -> list[Sample]:
    """Samples from the full-length mix, added until they hold at least `tokens` real tokens."""
    lengths = []
    for p, r in sample_lengths(100_000, seed):
        lengths.append((p, r))
        if sum(a + b for a, b in lengths) >= tokens:
            break
    return make_samples(lengths, vocab, seed)


def scaling(args) -> dict:
    """Cost per real token across step sizes on CPU (tiny kit's text model, full-length mix): flat means linear.

    Timing is interleaved: every round times each size's packed and padded step in turn, so a shared machine's drift
    (another job starting, the load changing) lands on every size alike instead of on whichever size ran then. A
    short step is timed several times per round (enough for --min-round-s of work), so the small sizes get as many
    seconds of samples as the large ones. Per size and variant: the median over all its samples."""
    from srpo_fast.models import load_policy
    from srpo_fast.tiny import ensure_tiny_kit

    device = torch.device("cpu")
    kit = ensure_tiny_kit(Path(tempfile.mkdtemp(prefix="step_kit_")), seed=0)
    model = load_policy(kit["text"], dtype=torch.float32, gradient_checkpointing=True)
    max_tokens = args.max_tokens or 4096
    clock = CLOCKS[CLOCK]
    cases = [prepare_case(f"tokens_{size}", model, samples_for(size, args.seed, model.config.vocab_size),
                          max_tokens, device) for size in args.sizes]
    plans = []  # (case index, variant, attention implementation, step, repeats per round)
    for i, case in enumerate(cases):
        for variant, (attn, step) in case_steps(model, case).items():
            set_attention(model, attn)
            for _ in range(max(1, args.warmup)):  # warm-up; its time sets the repeats per round
                t0 = clock()
                step()
                first = clock() - t0
                model.zero_grad(set_to_none=True)
            plans.append((i, variant, attn, step, max(1, math.ceil(args.min_round_s / max(first, 1e-6)))))
    samples = {(i, variant): [] for i, variant, *_ in plans}
    logp = {}
    load = [os.getloadavg()[0]]
    for _ in range(args.iters):
        for i, variant, attn, step, repeats in plans:
            set_attention(model, attn)
            for _ in range(repeats):
                t0 = clock()
                logp[i, variant] = step()
                samples[i, variant].append((clock() - t0) * 1e3)
                model.zero_grad(set_to_none=True)
        load.append(os.getloadavg()[0])
    results = {}
    for i, (size, case) in enumerate(zip(args.sizes, cases)):
        per_variant = {}
        for variant, (attn, step) in case_steps(model, case).items():
            set_attention(model, attn)
            times = samples[i, variant]
            seconds = statistics.median(times) / 1e3
            per_variant[variant] = {
                "step_ms": seconds * 1e3, "min_ms": min(times), "max_ms": max(times), "timed_runs": len(times),
                "tokens_per_s": case["real_tokens"] / seconds, "us_per_real_token": seconds * 1e6 / case["real_tokens"],
                "us_per_model_gflop": seconds * 1e6 / (case["flops"] / 1e9),
                "peak_mem_GB": peak_memory_bytes(step, device=device) / 2 ** 30,
                "tflops": case["flops"] / seconds / 1e12, "mfu": None, "logp_sum": logp[i, variant]}
            model.zero_grad(set_to_none=True)
        result = case_result(model, case, per_variant["packed"], per_variant["padded"])
        result["packed_over_padded_time"] = 1.0 / result["speedup"]
        for variant in ("packed", "padded"):
            r = result[variant]
            print(f"  {size:6d} {variant:7s} {r['step_ms']:9.1f} ms  {r['us_per_real_token']:7.1f} us/token  "
                  f"{r['us_per_model_gflop']:7.1f} us/GFLOP  ({r['timed_runs']} runs)", flush=True)
        results[str(size)] = result
    spread = {}
    for variant in ("packed", "padded"):
        costs = [r[variant]["us_per_real_token"] for r in results.values()]
        work = [r[variant]["us_per_model_gflop"] for r in results.values()]
        spread[variant] = {"us_per_real_token": costs, "max_over_min": max(costs) / min(costs),
                           "us_per_model_gflop": work, "work_max_over_min": max(work) / min(work)}
    print("cost per real token (us): " + "; ".join(
        f"{v} " + " ".join(f"{c:.1f}" for c in d["us_per_real_token"]) + f" (max/min {d['max_over_min']:.2f}, "
        f"per model FLOP {d['work_max_over_min']:.2f})" for v, d in spread.items()), flush=True)
    print("packed / padded time: " + " ".join(f"{r['packed_over_padded_time']:.3f}" for r in results.values()),
          flush=True)
    return {"smoke": False, "scaling": True, "device": "cpu", "sizes": args.sizes, "clock": CLOCK,
            "torch_threads": torch.get_num_threads(), "rounds": args.iters, "min_round_s": args.min_round_s,
            "load_average_1min": {"min": min(load), "max": max(load), "per_round": load},
            "max_tokens_per_microbatch": max_tokens, "gradient_checkpointing": True, "results": results,
            "cost_spread": spread}


def full(args) -> dict:
    if not torch.cuda.is_available():
        raise SystemExit("the full run needs CUDA; use --smoke on CPU")
    device = torch.device("cuda")
    name = torch.cuda.get_device_name(0)
    peak = args.peak_tflops or (H100_BF16_DENSE_TFLOPS if ("H100" in name or "H200" in name) else None)
    max_tokens = args.max_tokens or 16384
    results = {}
    for model_name in args.models:
        model = build_cuda_model(model_name, device, args.seed)
        samples = make_samples(sample_lengths(args.samples or 64, args.seed), model.config.vocab_size, args.seed)
        results[model_name] = run_model(model_name, model, samples, max_tokens, device, args,
                                        peak * 1e12 if peak else None)
        del model
        free_memory()
    return {"smoke": False, "device": name, "peak_tflops": peak, "samples": args.samples or 64,
            "max_tokens_per_microbatch": max_tokens, "gradient_checkpointing": True, "results": results}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU")
    parser.add_argument("--out", type=Path, default=None, help="results JSON path")
    parser.add_argument("--models", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--samples", type=int, default=None, help="samples per step (64 on CUDA, 12 smoke)")
    parser.add_argument("--max-tokens", type=int, default=None, help="token budget per micro-batch")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: H100 bf16)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scaling", action="store_true", help="CPU: cost per real token across --sizes")
    parser.add_argument("--sizes", nargs="+", type=int, default=[2048, 4096, 8192, 16384, 32768],
                        help="real tokens per step for --scaling")
    parser.add_argument("--clock", choices=list(CLOCKS), default="wall", help="CPU: wall or process CPU time")
    parser.add_argument("--min-round-s", type=float, default=1.0,
                        help="--scaling: seconds of timed work per size, variant and round (short steps repeat)")
    args = parser.parse_args(argv)
    global CLOCK
    CLOCK = args.clock
    args.iters = args.iters or (1 if args.smoke else 5 if args.scaling else 3)
    data = scaling(args) if args.scaling else smoke(args) if args.smoke else full(args)
    name = "step_scaling" if args.scaling else "step_smoke" if args.smoke else "step"
    path = write_results(name, data, args.out)
    measured = {k: r for k, r in data["results"].items() if "tokens_per_s" in r["packed"]
                and "tokens_per_s" in r["padded"]}
    plot_bars(path.with_suffix(".png"), [
        ("fwd+bwd throughput", "real tokens / s", {k: {v: r[v]["tokens_per_s"] for v in ("packed", "padded")}
                                                   for k, r in measured.items()}),
        ("peak memory", "GiB", {k: {v: r[v]["peak_mem_GB"] for v in ("packed", "padded")}
                                for k, r in measured.items()})])
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
