"""Reward throughput: parse + grade + compose for a batch of SRPO-format responses.

The batch is generated here (seeded): prompts × 8 rollouts sharing a gold, answers as integers, decimals,
fractions, boxed answers, multiple-choice letters and option texts, LaTeX expressions, plus first-solution-only
and malformed responses. Three mixes:
  fast    — what the fast path decides alone (the common case; target ≤ 100 ms for 1024 on 16 cores),
  mixed   — one prompt in five has a symbolic LaTeX gold that needs math-verify,
  hostile — the fast mix with --hostile-distinct answers that hang sympy (towers like 3^{9^{9^{9}}}), each in two
            spellings, scattered over the batch: every one costs a grade timeout and a worker kill. Timed once
            (paper preset), with the timeouts, the math-verify jobs and the worker restarts it caused.
Reported per mix and preset: wall time of score_batch with a warm grader pool (median over --iters), the
phases, and the math-verify share (items that went there, unique jobs, time spent). The pool's cold start-up
is reported separately.

  python benchmarks/reward.py --workers 16            # GPU machine (tensors on cuda)
  python benchmarks/reward.py --workers 2 --smoke     # tiny CPU run (what the test runs)
  python benchmarks/reward.py --workers 2 --mixes hostile --count 4096 --hostile-distinct 40 --grade-timeout 1
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import RESULTS_DIR, plot_bars, write_results  # noqa: E402
from srpo_fast.reward import RewardConfig, score_batch  # noqa: E402
from srpo_fast.reward.pool import GraderPool, get_pool  # noqa: E402

try:
    from srpo_fast.reward.pool import default_num_workers  # noqa: E402
except ImportError:  # an older tree, for before/after figures
    def default_num_workers() -> int:
        return min(16, os.cpu_count() or 1)

ROLLOUTS = 8
WORDS = ("so", "the", "area", "is", "then", "we", "compute", "angle", "side", "length", "thus", "check", "value",
         "triangle", "circle", "sum", "because", "given", "figure", "shows", "let", "x", "equals", "hence")


def _text(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def _integer(rng):
    g = rng.randint(2, 500)
    return str(g), [str(g), f"\\boxed{{{g}}}", f"{g}.0", f"The answer is \\boxed{{{g}}}.", f"x = {g}"], \
        [str(g + 1), f"\\boxed{{{g - 1}}}"], None


def _decimal(rng):
    num, den = rng.randint(1, 99), rng.choice([2, 4, 5, 8])
    g = num / den
    return f"{g:g}", [f"{g:g}", f"\\frac{{{num}}}{{{den}}}", f"{num}/{den}", f"\\boxed{{{g:g}}}"], \
        [f"{g + 0.5:g}", f"\\boxed{{{num + 1}/{den}}}"], None


def _fraction(rng):
    num, den = rng.randint(1, 9), rng.choice([3, 7, 9, 11])
    return f"\\frac{{{num}}}{{{den}}}", [f"\\frac{{{num}}}{{{den}}}", f"\\dfrac{{{num}}}{{{den}}}", f"{num}/{den}",
                                        f"\\boxed{{\\frac{{{num}}}{{{den}}}}}"], [f"{num + 1}/{den}"], None


def _letter(rng):
    options = [str(rng.randint(1, 99)) for _ in range(4)]
    options = list(dict.fromkeys(options)) + [f"o{i}" for i in range(4 - len(set(options)))]
    k = rng.randrange(4)
    g = "ABCD"[k]
    wrong = "ABCD"[(k + 1) % 4]
    return g, [g, f"({g})", f"Answer: {g}", f"\\boxed{{{g}}}", options[k]], [wrong, f"({wrong})"], options


def _latex(rng):
    a = rng.randint(2, 9)
    forms = [
        (f"{a}\\sqrt{{3}}", [f"{a}\\sqrt{{3}}", f"\\sqrt{{{3 * a * a}}}", f"{a}\\sqrt3"], [f"{a + 1}\\sqrt{{3}}"]),
        (f"x^2+{2 * a}x+{a * a}", [f"(x+{a})^2", f"x^2+{2 * a}x+{a * a}"], [f"(x-{a})^2"]),
        (f"\\frac{{\\pi}}{{{a}}}", [f"\\frac{{\\pi}}{{{a}}}", f"\\pi/{a}"], [f"\\frac{{\\pi}}{{{a + 1}}}"]),
    ]
    g, right, wrong = rng.choice(forms)
    return g, right, wrong, None


FAST_KINDS = (_integer, _decimal, _fraction, _letter)


def make_batch(count: int, mix: str, seed: int = 0):
    """(responses, golds, options) for ``count`` responses in groups of 8."""
    rng = random.Random(seed)
    responses, golds, options = [], [], []
    prompt = 0
    while len(responses) < count:
        kind = _latex if mix == "mixed" and prompt % 5 == 0 else rng.choice(FAST_KINDS)
        prompt += 1
        gold, right, wrong, opts = kind(rng)
        for _ in range(min(ROLLOUTS, count - len(responses))):
            a1 = rng.choice(right if rng.random() < 0.5 else wrong)
            a2 = rng.choice(right if rng.random() < 0.6 else wrong)
            t1, t2, r = _text(rng, 40, 250), _text(rng, 20, 150), _text(rng, 10, 80)
            shape = rng.random()
            if shape < 0.8:
                text = (f"<think>{t1}</think>\n<answer>{a1}</answer>\n<reflection>{r}</reflection>\n"
                        f"<think>{t2}</think>\n<answer>{a2}</answer>")
            elif shape < 0.9:
                text = f"<think>{t1}</think>\n<answer>{a1}</answer>"
            else:  # malformed: unclosed, nested, prose around, missing tags
                text = rng.choice([f"<think>{t1}<answer>{a1}</answer>", f"Sure! {t1} The answer is {a1}.",
                                   f"<think>{t1}</think><think>{t2}</think><answer>{a1}</answer>",
                                   f"<think>{t1}</think>\n<answer>{a1}</answer><reflection>{r}"])
            responses.append(text)
            golds.append(gold)
            options.append(opts)
    return responses, golds, options


def make_hostile_batch(count: int, distinct: int, seed: int = 0):
    """The fast mix with ``distinct`` sympy-hanging answers, each written two ways (``a^{b}`` and ``a ^ {b}``),
    put in place of the answers of random responses."""
    rng = random.Random(seed + 1)
    responses, golds, options = make_batch(count, "fast", seed)
    slots = rng.sample(range(count), min(count, 2 * distinct))
    for j, i in enumerate(slots):
        k = 2 + j // 2
        answer = f"{k}^{{9^{{9^{{9}}}}}}" if j % 2 == 0 else f"{k} ^ {{9^{{9^{{9}}}}}}"
        responses[i] = (f"<think>{_text(rng, 20, 60)}</think>\n<answer>{answer}</answer>\n"
                        f"<reflection>ok</reflection>\n<think>{_text(rng, 10, 30)}</think>\n<answer>{answer}</answer>")
        golds[i], options[i] = "5", None
    return responses, golds, options


def bench_hostile(count: int, distinct: int, workers: int, timeout_s: float, device: torch.device) -> dict:
    pool = get_pool(workers)
    pool.wait_ready()
    restarts = pool.restarts
    responses, golds, options = make_hostile_batch(count, distinct)
    cfg = RewardConfig(preset="paper", num_workers=workers, grade_timeout_s=timeout_s)
    t0 = time.perf_counter()
    out = score_batch(responses, golds, cfg, options=options, device=device)
    wall = time.perf_counter() - t0
    return {"count": count, "distinct_hanging_answers": distinct, "spellings_each": 2, "grade_timeout_s": timeout_s,
            "workers": workers, "spares": getattr(pool, "spares", 0), "wall_s": wall, "timeouts": out.timeouts,
            "math_verify_jobs": int(out.stats["math_verify_jobs"]), "worker_restarts": pool.restarts - restarts,
            "lower_bound_s": distinct * timeout_s / workers}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(responses, golds, options, preset: str, workers: int, device: torch.device, iters: int) -> dict:
    cfg = RewardConfig(preset=preset, num_workers=workers)
    out = score_batch(responses, golds, cfg, options=options, device=device)  # warm-up (pool, caches)
    times, runs = [], []
    for _ in range(iters):
        _sync(device)
        t0 = time.perf_counter()
        out = score_batch(responses, golds, cfg, options=options, device=device)
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
        runs.append(out.stats)
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    graded = max(1, med["graded"])
    return {
        "median_ms": statistics.median(times), "min_ms": min(times),
        "parse_ms": med["parse_s"] * 1e3, "fast_path_ms": med["fast_path_s"] * 1e3,
        "math_verify_ms": med["math_verify_s"] * 1e3, "features_ms": med["features_s"] * 1e3,
        "compose_ms": med["compose_s"] * 1e3,
        "answers_graded": int(med["graded"]), "math_verify_items": int(med["math_verify_items"]),
        "math_verify_jobs": int(med["math_verify_jobs"]),
        "math_verify_share": med["math_verify_items"] / graded,
        "math_verify_time_share": med["math_verify_s"] / max(1e-9, statistics.median(times) / 1e3),
        "timeouts": out.timeouts,
        "first_accuracy": out.first_correct.float().mean().item(),
        "mean_total": out.total.float().mean().item(),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=1024)
    parser.add_argument("--workers", type=int, default=default_num_workers())
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run: 32 responses, 1 iteration")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/reward[_smoke].json)")
    parser.add_argument("--mixes", default="fast,mixed,hostile", help="comma-separated: fast, mixed, hostile")
    parser.add_argument("--hostile-distinct", type=int, default=40, help="hanging answers in the hostile mix")
    parser.add_argument("--grade-timeout", type=float, default=5.0, help="grade_timeout_s for the hostile mix")
    args = parser.parse_args(argv)
    mixes = [m for m in args.mixes.split(",") if m]
    if any(m not in ("fast", "mixed", "hostile") for m in mixes):
        parser.error(f"--mixes: unknown mix in {args.mixes!r}")
    if args.smoke:
        args.count, args.iters, args.device = 32, 1, "cpu"
        args.hostile_distinct, args.grade_timeout = 2, 0.5
    name = "reward_smoke" if args.smoke else "reward"
    out = args.out or RESULTS_DIR / f"{name}.json"
    device = torch.device(args.device)

    t0 = time.perf_counter()
    cold = GraderPool(args.workers)
    cold.wait_ready()
    pool_start_s = time.perf_counter() - t0
    cold.close()
    get_pool(args.workers).wait_ready()

    results: dict[str, dict] = {}
    for mix in [m for m in mixes if m != "hostile"]:
        responses, golds, options = make_batch(args.count, mix)
        results[mix] = {preset: bench(responses, golds, options, preset, args.workers, device, args.iters)
                        for preset in ("paper", "official")}
        for preset, r in results[mix].items():
            print(f"{mix:6s} {preset:9s} {r['median_ms']:8.1f} ms  (parse {r['parse_ms']:.1f}, fast path "
                  f"{r['fast_path_ms']:.1f}, math-verify {r['math_verify_ms']:.1f} ms for "
                  f"{r['math_verify_items']} items / {r['math_verify_jobs']} jobs = "
                  f"{100 * r['math_verify_share']:.1f}% of {r['answers_graded']} answers, compose "
                  f"{r['compose_ms']:.2f})")
    if "hostile" in mixes:
        h = results["hostile"] = bench_hostile(args.count, args.hostile_distinct, args.workers, args.grade_timeout,
                                               device)
        print(f"hostile   paper     {h['wall_s']:8.2f} s   ({h['distinct_hanging_answers']} hanging answers x 2 "
              f"spellings in {h['count']}: {h['timeouts']} timeouts, {h['math_verify_jobs']} math-verify jobs, "
              f"{h['worker_restarts']} worker restarts; floor {h['lower_bound_s']:.1f} s = distinct x timeout / "
              f"workers; {h['workers']} workers + {h['spares']} spare)")
    print(f"grader pool cold start ({args.workers} workers): {pool_start_s:.2f} s")
    data = {"smoke": args.smoke, "count": args.count, "workers": args.workers, "iters": args.iters,
            "device": str(device), "cpu_count": os.cpu_count(), "target_ms_fast_mix_16_cores": 100.0,
            "pool_cold_start_s": pool_start_s, "results": results}
    path = write_results(name, data, out=out)
    bars = {f"{mix}/{preset}": {"parse": r["parse_ms"], "fast path": r["fast_path_ms"],
                                "math-verify": r["math_verify_ms"], "total": r["median_ms"]}
            for mix, by_preset in results.items() if mix != "hostile" for preset, r in by_preset.items()}
    if bars:
        plot_bars(Path(path).with_suffix(".png"), [("reward wall time per batch", "ms", bars)])
    print(f"wrote {path}")
    return data


if __name__ == "__main__":
    main()
