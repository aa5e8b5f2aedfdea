"""End-to-end GRPO steps side by side: srpo_fast (HF engine, vLLM engine) vs TRL's GRPOTrainer (HF generate, and
vLLM colocate as it behaves stock) on the same work.

The work: the tiny offline Qwen2.5-VL kit (`python -m srpo_fast.tiny`), the synthetic visual task (one image per
prompt), `--prompts` prompts x `--n` samples per step, `--tokens` new tokens at T = 1.0 (top-k/top-p off), AdamW,
one epoch over prompts x steps records; both sides score with srpo_fast's paper reward (a random model scores 0:
the step still runs every phase) and neither filters groups. Every framework run is its own subprocess, and the
repeats are interleaved (round r runs every framework once, in a rotated order), so drift of a shared machine hits
all of them alike. Per run: median over the steady steps (the first is warm-up) of step time, generation time
(srpo_fast: its rollout phase; TRL: its `_generate`), the rest of the step (reward, log-probs, update, weight sync),
response tokens/s, and the process's peak RSS. Reported: median over repeats with min/max.

Also per srpo_fast run: the update's useful FLOPs (the policy's forward + backward over every trained token: step.py's
formula on the language model; the frozen vision tower's forward, the optimizer step and any reference forward are not
counted) and the update's achieved TFLOP/s, and on an H100/H200 its MFU (of 989 TFLOP/s bf16 dense).
A framework whose packages do not import here (TRL without `trl`/`datasets`, either one with vLLM but no `vllm`)
is reported as unavailable, with the import error, and not run.

  python benchmarks/e2e.py                        # 8 prompts x 8 samples x 128 tokens, 3 steps, 5 repeats
  python benchmarks/e2e.py --smoke --out X.json   # 2 x 2 x 8 tokens, 2 steps, one repeat (the test suite runs it)
  python benchmarks/e2e.py --gpu --model DIR      # CUDA, bf16, a VL model of your choice (the GPU check's part)
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

FRAMEWORKS = ("srpo_vllm", "srpo_hf", "trl_hf", "trl_vllm")
H100_BF16_DENSE_TFLOPS = 989.0
# what each framework imports beyond srpo_fast's own requirements (probed before any run)
NEEDS = {"srpo_vllm": ("vllm",), "srpo_hf": (), "trl_hf": ("trl", "datasets"), "trl_vllm": ("trl", "datasets", "vllm")}
LABELS = {"srpo_vllm": "srpo_fast + vLLM (default)", "srpo_hf": "srpo_fast + HF engine",
          "trl_hf": "TRL + HF generate", "trl_vllm": "TRL + vLLM colocate (stock)"}


# ---- workers (one framework, one run, in its own process) ----------------------------------------------------------
def _records(args) -> list[dict]:
    from srpo_fast.data.synthetic import make_dataset

    return make_dataset(args.prompts * args.steps, seed=args.seed, difficulty=1)


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux


def run_srpo(args, engine: str) -> dict:
    from srpo_fast.config import load_config
    from srpo_fast.data.synthetic import write_dataset
    from srpo_fast.train.grpo import train_grpo
    from srpo_fast.utils.distributed import init_distributed
    from srpo_fast.utils.metrics import read_metrics

    import srpo_fast.train.grpo as grpo

    init_distributed()  # what `python -m srpo_fast.train` does first (a one-rank group here)
    work = Path(args.work)
    flops: list[float] = []
    update = grpo.policy_update

    def counted_update(cfg, run, items, *rest):  # measurement only: the trainer's own update, its work counted
        flops.append(update_flops(run.model, [(it.sample.num_tokens, it.sample.response_ids.numel())
                                              for it in items.local.values()]))
        return update(cfg, run, items, *rest)

    grpo.policy_update = counted_update
    data = write_dataset(_records(args), work / "data")
    overrides = [f"model.path={args.kit}", f"data.train_files=[{data}]", f"rollout.engine={engine}",
                 f"rollout.n={args.n}", f"train.prompts_per_step={args.prompts}", f"rollout.max_tokens={args.tokens}",
                 "rollout.temperature=1.0", "algo.filter_groups=false", "train.val_every=0", "train.epochs=1",
                 f"train.max_steps={args.steps}", f"train.save_every={args.steps + 1}", "log.progress=false",
                 f"train.output_dir={work / 'run'}", "data.shuffle=false", f"train.seed={args.seed}",
                 f"model.dtype={'bfloat16' if args.gpu else 'float32'}"]
    if engine == "vllm":
        overrides += ["rollout.kv_cache_gb=0.25", "rollout.max_model_len=1024"]
    cfg = load_config(HERE.parent / "configs" / "demo_cpu.yaml", overrides)
    train_grpo(cfg)
    rows = read_metrics(work / "run" / "metrics.jsonl")
    if len(flops) != len(rows):
        raise RuntimeError(f"{len(flops)} updates counted for {len(rows)} logged steps")
    return {"steps": [{"step_s": r["timing/step_s"], "generation_s": r["timing/rollout_s"],
                       "reward_s": r.get("timing/reward_s", 0.0), "update_s": r.get("timing/train_s", 0.0),
                       "sync_s": r.get("timing/sync_s", 0.0), "update_tflop": f / 1e12,
                       "gpu_mem_peak_gb": r.get("perf/gpu_mem_peak_GB"),
                       "response_tokens": r["response/length_mean"] * r["rollout/samples"]}
                      for r, f in zip(rows, flops)]}


def update_flops(model, sequences: list[tuple[int, int]]) -> float:
    """Useful FLOPs of one forward + backward of the policy over `sequences` [(tokens, response tokens)]:
    6 x (language-model parameters without embeddings) x tokens + 6 x V x H x response tokens (the LM head scores
    response tokens only) + 6 x layers x H x sum(L^2) (causal attention), as benchmarks/step.py counts them."""
    from srpo_fast.models.loading import backbone, output_head

    inner = backbone(model)
    language = getattr(inner, "language_model", inner)
    embed = model.get_input_embeddings().weight
    head = output_head(model)[0]
    body = sum(p.numel() for p in language.parameters()) - embed.numel()
    config = getattr(model.config, "text_config", model.config)
    tokens = sum(n for n, _ in sequences)
    responses = sum(r for _, r in sequences)
    square = sum(n * n for n, _ in sequences)
    return (6.0 * body * tokens + 6.0 * head.numel() * responses
            + 6.0 * config.num_hidden_layers * config.hidden_size * square)


def run_trl(args, use_vllm: bool) -> dict:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from srpo_fast.data.prompts import build_messages
    from srpo_fast.models.processor import load_processor
    from srpo_fast.reward import RewardConfig, score_batch

    records = _records(args)
    def as_parts(messages):  # one content type per column for the dataset (Arrow): text parts everywhere
        return [{**m, "content": [{"type": "text", "text": m["content"]}] if isinstance(m["content"], str)
                 else m["content"]} for m in messages]

    dataset = Dataset.from_list([{"prompt": as_parts(build_messages(r, "srpo")), "image": r["images"][0],
                                  "answer": r["answer"]} for r in records])
    reward_config = RewardConfig(preset="paper")

    def paper_reward(prompts, completions, answer, **kwargs):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return score_batch(texts, [str(a) for a in answer], config=reward_config).total.tolist()

    extra = dict(use_vllm=True, vllm_mode="colocate", vllm_enable_sleep_mode=False) if use_vllm else {}
    config = GRPOConfig(output_dir=str(Path(args.work) / "trl"), per_device_train_batch_size=args.prompts * args.n,
                        gradient_accumulation_steps=1, num_generations=args.n, max_completion_length=args.tokens,
                        temperature=1.0, top_p=1.0, top_k=0, learning_rate=1e-4, num_train_epochs=1,
                        max_steps=args.steps, logging_steps=1, report_to="none", save_strategy="no",
                        use_cpu=not args.gpu, bf16=args.gpu, seed=args.seed, dataloader_num_workers=0, **extra)
    processor = load_processor(args.kit)
    trainer = GRPOTrainer(model=args.kit, reward_funcs=paper_reward, args=config, train_dataset=dataset,
                          processing_class=processor)
    steps: list[dict] = []
    generation = {"s": 0.0}
    generate = trainer._generate

    def timed_generate(*a, **kw):  # measurement only: TRL's own generation, timed
        start = time.perf_counter()
        try:
            return generate(*a, **kw)
        finally:
            generation["s"] += time.perf_counter() - start

    trainer._generate = timed_generate

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **kw):
            generation["s"] = 0.0
            self.start = time.perf_counter()

        def on_step_end(self, *a, **kw):
            steps.append({"step_s": time.perf_counter() - self.start, "generation_s": generation["s"]})

        def on_log(self, _args, state, control, logs=None, **kw):
            if logs and "completions/mean_length" in logs and steps:
                steps[-1]["response_tokens"] = logs["completions/mean_length"] * args.prompts * args.n

    trainer.add_callback(StepTimer())
    torch.manual_seed(args.seed)
    trainer.train()
    return {"steps": steps}


def worker(args) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    start = time.perf_counter()
    try:
        if args.worker.startswith("srpo_"):
            result = run_srpo(args, args.worker.removeprefix("srpo_"))
        else:
            result = run_trl(args, args.worker == "trl_vllm")
        result["status"] = "ok"
    except BaseException as exc:  # a crash is a result too (TRL + vLLM on CPU): record it
        result = {"status": "error", "error": f"{type(exc).__name__}: {exc}"[:2000],
                  "traceback": traceback.format_exc()[-4000:]}
    result.update(wall_s=time.perf_counter() - start, peak_rss_gb=_peak_rss_gb())
    if args.gpu:  # the trainer resets torch's peak every step and logs each step's: the largest of them all
        import torch

        peaks = [s["gpu_mem_peak_gb"] for s in result.get("steps", []) if s.get("gpu_mem_peak_gb") is not None]
        result["peak_gpu_mem_gb"] = max(peaks + [torch.cuda.max_memory_allocated() / 1e9])
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"[e2e worker] {args.worker}: {result['status']}", flush=True)
    os._exit(0)  # in-process vLLM engines may hang in teardown; the result is written


# ---- driver ----------------------------------------------------------------------------------------------------------
def steady(steps: list[dict], key: str) -> float | None:
    values = [s[key] for s in steps[1:] or steps if s.get(key) is not None]
    return statistics.median(values) if values else None


def summarize(runs: list[dict], peak_tflops: float | None = None) -> dict:
    ok = [r for r in runs if r["status"] == "ok" and r.get("steps")]
    out = {"runs": len(runs), "ok": len(ok)}
    errors = sorted({r.get("error", "no steps") for r in runs if r not in ok})
    if errors:
        out["errors"] = errors
    if not ok:
        return out
    per_run = []
    for r in ok:
        step = steady(r["steps"], "step_s")
        gen = steady(r["steps"], "generation_s")
        tokens = steady(r["steps"], "response_tokens")
        row = {"step_s": step, "generation_s": gen, "rest_s": step - gen if gen is not None else None,
               "steps_per_s": 1.0 / step, "tokens_per_s": tokens / step if tokens else None,
               "peak_rss_gb": r["peak_rss_gb"]}
        for key in ("reward_s", "update_s", "sync_s", "update_tflop"):
            value = steady(r["steps"], key)
            if value is not None:
                row[key] = value
        if row.get("update_tflop") and row.get("update_s"):
            row["update_tflops"] = row["update_tflop"] / row["update_s"]
            if peak_tflops:
                row["update_mfu"] = row["update_tflops"] / peak_tflops
        if r.get("peak_gpu_mem_gb") is not None:
            row["peak_gpu_mem_gb"] = r["peak_gpu_mem_gb"]
        per_run.append(row)
    for key in per_run[0]:
        values = [p[key] for p in per_run if p.get(key) is not None]
        if values:
            out[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    return out


def run_worker(name: str, args, kit: Path, work: Path, timeout_s: float) -> dict:
    out = work / f"{name}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--kit", str(kit), "--work",
           str(work / name), "--out", str(out), "--prompts", str(args.prompts), "--n", str(args.n),
           "--tokens", str(args.tokens), "--steps", str(args.steps), "--seed", str(args.seed),
           *(["--gpu"] if args.gpu else [])]
    (work / name).mkdir(parents=True, exist_ok=True)
    env = worker_env(args)
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env, cwd=HERE.parent)
        log = proc.stdout + proc.stderr
        result = json.loads(out.read_text()) if out.is_file() else {
            "status": "error", "error": f"worker exited {proc.returncode} without a result", "log_tail": log[-3000:]}
    except subprocess.TimeoutExpired:
        result = {"status": "error", "error": f"timeout after {timeout_s:.0f} s"}
    step = steady(result.get("steps") or [], "step_s")
    print(f"[e2e] {name:10s} {result['status']:6s} {time.perf_counter() - start:6.1f} s wall"
          + (f", {step:.2f} s/step" if step else f", {result.get('error', '')[:160]}"), flush=True)
    return result


def worker_env(args) -> dict:
    pythonpath = os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")]))  # keep carried wheels
    env = {**os.environ, "PYTHONPATH": pythonpath, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    return env


def unavailable(name: str, args) -> str | None:
    """Why `name` cannot run here (its first import error), or None: imported in a child, as the worker would."""
    if not NEEDS[name]:
        return None
    code = "\n".join(f"import {module}" for module in NEEDS[name])
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                              env=worker_env(args), cwd=HERE.parent)
    except subprocess.TimeoutExpired:
        return f"importing {', '.join(NEEDS[name])} took over 120 s"
    if proc.returncode == 0:
        return None
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    return lines[-1] if lines else f"importing {', '.join(NEEDS[name])} exited {proc.returncode}"


def driver(args) -> dict:
    from srpo_fast.tiny import ensure_tiny_kit

    work = Path(tempfile.mkdtemp(prefix="e2e_"))
    kit = Path(args.model) if args.model else ensure_tiny_kit(work / "kit", seed=0)["vl"]
    missing = {name: why for name in args.frameworks if (why := unavailable(name, args))}
    for name, why in missing.items():
        print(f"[e2e] {name:10s} not available here: {why}", flush=True)
    names = [name for name in args.frameworks if name not in missing]
    runs: dict[str, list[dict]] = {name: [] for name in names}
    if not names:  # nothing can run here: the report says why
        return report(args, runs, rounds=0, missing=missing)
    for round_ in range(args.repeats):
        order = names[round_ % len(names):] + names[:round_ % len(names)]
        for name in order:
            runs[name].append(run_worker(name, args, kit, work / f"r{round_}", args.timeout_s))
        data = report(args, runs, rounds=round_ + 1, missing=missing)  # rewritten after every round: a cut-short
    return data                                                          # run keeps its finished rounds


def describe_model(args) -> str:
    if not args.model:
        return "tiny Qwen2.5-VL"
    config = json.loads((Path(args.model) / "config.json").read_text())
    text = config.get("text_config", config)
    return (f"{Path(args.model).name}: {config.get('model_type')}, {text.get('num_hidden_layers')} layers, hidden "
            f"{text.get('hidden_size')}, MLP {text.get('intermediate_size')}")


def device_name(args) -> str:
    if not args.gpu:
        return "cpu"
    import torch

    return torch.cuda.get_device_name(0)


def peak_tflops(args, device: str) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops
    return H100_BF16_DENSE_TFLOPS if ("H100" in device or "H200" in device) else None


def report(args, runs: dict[str, list[dict]], rounds: int, missing: dict[str, str] | None = None) -> dict:
    from benchmarks._common import write_results

    device = device_name(args)
    peak = peak_tflops(args, device)
    summary = {name: {"label": LABELS[name], **summarize(rs, peak)} for name, rs in runs.items()}
    for name, why in (missing or {}).items():
        summary[name] = {"label": LABELS[name], "unavailable": why}
    ratios = {}

    def ratio(a: str, b: str) -> float | None:
        sa, sb = summary.get(a, {}).get("steps_per_s"), summary.get(b, {}).get("steps_per_s")
        return sa["median"] / sb["median"] if sa and sb else None

    for a, b in (("srpo_vllm", "trl_hf"), ("srpo_hf", "trl_hf"), ("srpo_vllm", "trl_vllm")):
        value = ratio(a, b)
        if value is not None:
            ratios[f"{a}_over_{b}_steps_per_s"] = value
    data = {"smoke": args.smoke, "device": device, "cpu_count": os.cpu_count(),
            "omp_num_threads": args.threads or os.environ.get("OMP_NUM_THREADS"),
            "load_average_at_end": os.getloadavg(), "peak_tflops": peak,
            "work": {"prompts": args.prompts, "n": args.n, "max_new_tokens": args.tokens, "steps": args.steps,
                     "repeats": rounds, "temperature": 1.0, "optimizer": "AdamW", "model": describe_model(args),
                     **({"dtype": "bfloat16"} if args.gpu else {})},
            "summary": summary, "ratios": ratios, "runs": runs}
    for s in summary.values():
        if "step_s" in s:
            mfu = s.get("update_mfu", {}).get("median")
            tflops = s.get("update_tflops", {}).get("median")
            print(f"{s['label']:32s} {s['step_s']['median']:7.2f} s/step [{s['step_s']['min']:.2f}, "
                  f"{s['step_s']['max']:.2f}]  gen {s['generation_s']['median']:6.2f} s  "
                  f"rest {s['rest_s']['median']:6.2f} s  peak {s['peak_rss_gb']['median']:.2f} GB"
                  + (f"  update {tflops:.3g} TFLOP/s" if tflops else "")
                  + (f" (MFU {mfu * 100:.1f}%)" if mfu else ""), flush=True)
        elif "unavailable" in s:
            print(f"{s['label']:32s} not available: {s['unavailable']}", flush=True)
        else:
            print(f"{s['label']:32s} failed: {s.get('errors')}", flush=True)
    default = ("e2e_gpu_smoke" if args.smoke else "e2e_gpu") if args.gpu else "e2e_smoke" if args.smoke else "e2e"
    path = write_results(default, data, args.out)
    _plot(path.with_suffix(".png"), summary)
    print(f"wrote {path}")
    return data


def _plot(path: Path, summary: dict) -> None:
    from benchmarks._common import plot_bars

    ok = {s["label"]: s for s in summary.values() if "step_s" in s}
    plot_bars(path, [
        ("seconds per step (median)", "s", {"step": {k: s["step_s"]["median"] for k, s in ok.items()}}),
        ("generation / rest of step", "s", {"generation": {k: s["generation_s"]["median"] for k, s in ok.items()},
                                            "rest": {k: s["rest_s"]["median"] for k, s in ok.items()}})])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="2 prompts x 2 samples x 8 tokens, 2 steps, 1 repeat")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--frameworks", nargs="+", default=list(FRAMEWORKS), choices=FRAMEWORKS)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3, help="steps per run (the first is warm-up)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout-s", type=float, default=1800.0, help="per framework run")
    parser.add_argument("--threads", type=int, default=None,
                        help="OMP_NUM_THREADS for every worker (1 keeps a shared, oversubscribed machine fair)")
    parser.add_argument("--gpu", action="store_true", help="CUDA in bf16 (srpo_fast: model.dtype=bfloat16; TRL: bf16)")
    parser.add_argument("--model", default=None, help="a Qwen2.5-VL model dir with its processor (default: tiny kit)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: H100 bf16)")
    parser.add_argument("--worker", choices=FRAMEWORKS, help=argparse.SUPPRESS)
    parser.add_argument("--kit", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return
    if args.gpu:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--gpu needs a CUDA device")
    if args.smoke:
        args.prompts, args.n, args.tokens, args.steps, args.repeats = 2, 2, 8, 2, 1
    driver(args)


if __name__ == "__main__":
    main()
