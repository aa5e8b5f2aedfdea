"""`python -m srpo_fast.eval --model DIR --benchmark NAME --data PATH --out DIR [...]`: generate, score, report.

Reads local files only (a .parquet/.jsonl file or a directory of them, in the benchmark's Hugging Face layout);
rerunning with the same --out resumes: items already in OUT/<benchmark>.results.jsonl are not generated again.
"""
from __future__ import annotations

import argparse
import json
import sys

from srpo_fast.eval.benchmarks import BENCHMARKS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m srpo_fast.eval", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="local HF model directory")
    p.add_argument("--benchmark", required=True, help=f"one of {', '.join(sorted(BENCHMARKS))}")
    p.add_argument("--data", required=True, help="a .parquet/.jsonl file or a directory of them")
    p.add_argument("--out", required=True, help="results directory (resumable)")
    p.add_argument("--limit", type=int, default=None, help="only the first N valid items")
    p.add_argument("--engine", choices=("vllm", "hf"), default="vllm")
    p.add_argument("--template", choices=("srpo", "r1"), default="srpo")
    p.add_argument("--max-tokens", type=int, default=2048)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                   help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--max-model-len", type=int, default=8192)
    p.add_argument("--min-pixels", type=int, default=None)
    p.add_argument("--max-pixels", type=int, default=None)
    kv = p.add_mutually_exclusive_group()
    kv.add_argument("--kv-cache-gb", type=float, default=None, help="vLLM KV cache size in GiB (set it on CPU)")
    kv.add_argument("--kv-cache-bytes", type=int, default=None, help="the same in bytes")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.8)
    p.add_argument("--enforce-eager", action="store_true")
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
            enforce_eager=args.enforce_eager)
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
