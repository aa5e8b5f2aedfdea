"""`python -m srpo_fast.eval --model DIR --benchmark NAME --data PATH --out DIR [...]`: generate, score, report.

Reads local files only (a .parquet/.jsonl file or a directory of them, in the benchmark's Hugging Face layout);
rerunning with the same --out resumes: items already in OUT/<benchmark>.results.jsonl are not generated again.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable

from srpo_fast.eval.benchmarks import BENCHMARKS


def _number(kind: type, check: Callable[[float], bool], what: str) -> Callable[[str], int | float]:
    """An argparse type: `kind(text)`, finite, passing `check`; otherwise a usage error saying `what`."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if not math.isfinite(value) or not check(value):
            raise argparse.ArgumentTypeError(f"{text!r}: must be {what}")
        return value

    return parse


POSITIVE_INT = _number(int, lambda v: v >= 1, ">= 1")
NON_NEGATIVE_INT = _number(int, lambda v: v >= 0, ">= 0")
TEMPERATURE = _number(float, lambda v: v >= 0, "a finite number >= 0 (0: greedy)")
FRACTION = _number(float, lambda v: 0 < v <= 1, "in (0, 1]")
POSITIVE_FLOAT = _number(float, lambda v: v > 0, "a finite number > 0")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m srpo_fast.eval", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="local HF model directory")
    p.add_argument("--benchmark", required=True, help=f"one of {', '.join(sorted(BENCHMARKS))}")
    p.add_argument("--data", required=True, help="a .parquet/.jsonl file or a directory of them")
    p.add_argument("--out", required=True, help="results directory (resumable)")
    p.add_argument("--limit", type=POSITIVE_INT, default=None, help="only the first N valid items")
    p.add_argument("--engine", choices=("vllm", "hf"), default="vllm")
    p.add_argument("--template", choices=("srpo", "r1"), default="srpo")
    p.add_argument("--max-tokens", type=POSITIVE_INT, default=2048)
    p.add_argument("--temperature", type=TEMPERATURE, default=0.0)
    p.add_argument("--top-p", type=FRACTION, default=1.0)
    p.add_argument("--seed", type=NON_NEGATIVE_INT, default=0)
    p.add_argument("--batch-size", type=POSITIVE_INT, default=32)
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                   help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--max-model-len", type=POSITIVE_INT, default=8192)
    p.add_argument("--min-pixels", type=POSITIVE_INT, default=None)
    p.add_argument("--max-pixels", type=POSITIVE_INT, default=None)
    kv = p.add_mutually_exclusive_group()
    kv.add_argument("--kv-cache-gb", type=POSITIVE_FLOAT, default=None,
                    help="vLLM KV cache size in GiB (set it on CPU)")
    kv.add_argument("--kv-cache-bytes", type=POSITIVE_INT, default=None, help="the same in bytes")
    p.add_argument("--gpu-memory-utilization", type=FRACTION, default=0.8)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--allow-outside-paths", action="store_true",
                   help="let image paths in the data point outside its directory (off: such items are skipped)")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from srpo_fast.eval.runner import EvalSettings, run_eval

    try:
        settings = EvalSettings(
            model=args.model, benchmark=args.benchmark, data=args.data, out=args.out, limit=args.limit,
            engine=args.engine, template=args.template, max_tokens=args.max_tokens, temperature=args.temperature,
            top_p=args.top_p, seed=args.seed, batch_size=args.batch_size, dtype=args.dtype,
            max_model_len=args.max_model_len, min_pixels=args.min_pixels, max_pixels=args.max_pixels,
            kv_cache_gb=args.kv_cache_gb if args.kv_cache_bytes is None else args.kv_cache_bytes / (1 << 30),
            gpu_memory_utilization=args.gpu_memory_utilization,
            enforce_eager=args.enforce_eager, allow_outside_paths=args.allow_outside_paths)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summary = run_eval(settings, progress=not args.no_progress)
    brief = {k: summary[k] for k in ("benchmark", "n", "accuracy_first", "accuracy_final", "reflection_rate",
                                     "fix_rate", "break_rate", "mean_length", "generated", "resumed", "skipped",
                                     "skip_reasons")}
    print(json.dumps(brief, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
