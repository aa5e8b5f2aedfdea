"""The one-call GPU check: what a session with a lent GPU runs first (`bash scripts/gpu_check.sh [OUT_DIR]`).

Parts, in this order, each in its own process with its own time limit (a hang or crash loses that part only, the
rest still run), all within --budget-s (470 s: under 8 minutes; a part that would start later is skipped, said so):
  env        python / torch / CUDA / triton / transformers versions, the GPU, which attention and engine backends exist
  pytest     every `gpu`-marked test, Triton compiled for real (TRITON_INTERPRET=0)
  train      2 GRPO steps of the real trainer in bf16 with the HF engine on a model with Qwen2.5-VL-3B-shaped layers,
  train_offload  the same with train.cpu_offload=true
  kernels    benchmarks/kernels.py at the target shapes (torch.compile peers off: their compile time would not fit)
  step       benchmarks/step.py on a Qwen2.5-VL-3B-shaped random text model (packed vs padded forward+backward)
  e2e        benchmarks/e2e.py --gpu on the trainer parts' model: srpo_fast + HF engine vs TRL + HF generate, 3 steps
             each (TRL only where `trl` and `datasets` import, e.g. from wheels in .whl/; else reported unavailable),
             with the update's MFU; last, with what is left of the budget (at most 150 s)
Writes gpu_check.json (everything, the trainer's per-step metrics included), gpu_check.md (a summary), kernels.json,
step.json and e2e.json (the benchmarks' own results) to --out: five files.

`--dry-run` runs the same parts on the CPU with tiny shapes (pytest's gpu tests then skip, the benchmarks run their
smoke modes, the trainer one step on the tiny kit in fp32): the test suite runs it so the check cannot rot.
It needs no network and no vLLM; with --dry-run it needs no GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TAIL = 4000  # characters of each part's output kept in the JSON


@dataclass
class Part:
    name: str
    command: list[str]
    timeout_s: float
    env: dict[str, str] = field(default_factory=dict)
    status: str = "pending"  # ok | failed | timeout
    returncode: int | None = None
    seconds: float = 0.0
    tail: str = ""
    result: dict | None = None


def run_part(part: Part, cwd: Path = REPO) -> Part:
    """Run one part in its own process group; kill the whole group at its time limit."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **part.env}
    start = time.perf_counter()
    proc = subprocess.Popen(part.command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=part.timeout_s)
        part.status = "ok" if proc.returncode == 0 else "failed"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        part.status = "timeout"
        output += f"\n[killed after {part.timeout_s:.0f} s]"
    except BaseException:  # the check itself is stopped (Ctrl-C, SIGTERM): take the part's processes with it
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    part.returncode = proc.returncode
    part.seconds = time.perf_counter() - start
    part.tail = output[-TAIL:]
    print(f"[gpu_check] {part.name}: {part.status} in {part.seconds:.1f} s", flush=True)
    return part


# ------------------------------------------------------------------------------------------------------- env part
def environment() -> dict:
    """Versions and devices, printed as JSON by `--part env` (in a child, so the parent never initializes CUDA)."""
    import importlib.metadata as md
    import importlib.util

    import torch

    def version(name: str) -> str | None:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    from srpo_fast.models.attention import _torch_varlen, has_flash_attn

    info = {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
            "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
            "packages": {name: version(name) for name in ("triton", "transformers", "tokenizers", "safetensors",
                                                          "vllm", "flash-attn", "flash-attn-4", "liger-kernel",
                                                          "cut-cross-entropy", "math-verify", "nvidia-ml-py")},
            "flash_attn_2_usable": has_flash_attn(), "torch_varlen_attn": _torch_varlen() is not None,
            "vllm_importable": importlib.util.find_spec("vllm") is not None,
            "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET")}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_GiB=props.total_memory / 2**30,
                    capability=f"{props.major}.{props.minor}", multiprocessors=props.multi_processor_count,
                    gpus=torch.cuda.device_count())
        smi = shutil.which("nvidia-smi")
        if smi:
            out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                                 text=True, timeout=30)
            info["driver"] = out.stdout.strip()
    return info


# ----------------------------------------------------------------------------------------------------- the parts
def gpu_test_files() -> list[str]:
    """Test files holding gpu-marked tests (collecting only these keeps unrelated imports out of the check)."""
    return sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py")
                  if "pytest.mark.gpu" in p.read_text())


def trainer_command(model_dir: Path, out: Path, *, steps: int, dtype: str, offload: bool, dry_run: bool) -> list[str]:
    """`python -m srpo_fast.train` for a few GRPO steps with the HF engine, on the tiny kit's task, with a reward that
    gives a random model a learning signal (so every step updates and syncs)."""
    return [sys.executable, "-m", "srpo_fast.train", "--config", str(REPO / "configs" / "demo_cpu.yaml"),
            f"model.path={model_dir}", f"model.dtype={dtype}", f"train.output_dir={out}",
            f"train.max_steps={steps}", f"train.cpu_offload={str(offload).lower()}", "rollout.engine=hf",
            "reward.preset=trainer_rewards:digit_share", "algo.filter_groups=false", "train.val_every=0",
            "train.val_before_train=false", "train.save_every=1000", "log.progress=false",
            f"rollout.max_tokens={16 if dry_run else 64}", f"train.prompts_per_step={4 if dry_run else 8}",
            "rollout.n=4", "train.max_tokens_per_microbatch=4096", "train.export_final=false"]


def build_parts(out: Path, work: Path, dry_run: bool) -> list[Part]:
    py = sys.executable
    interpret = {"TRITON_INTERPRET": "1" if dry_run else "0"}
    tests_path = {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), str(REPO / "tests"),
                                                              os.environ.get("PYTHONPATH")]))}
    model_dir = work / "model"
    steps, dtype = (1, "float32") if dry_run else (2, "bfloat16")  # 2: a warm-up step and a steady one
    parts = [
        Part("env", [py, "-m", "srpo_fast.gpu_check", "--part", "env"], 60, dict(interpret)),
        Part("pytest", [py, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                        f"--junitxml={work / 'pytest_gpu.xml'}", *gpu_test_files()], 150, dict(interpret)),
    ]
    for name, offload in (("train", False), ("train_offload", True)):
        parts.append(Part(name, trainer_command(model_dir, work / name, steps=steps, dtype=dtype, offload=offload,
                                                dry_run=dry_run), 120, {**interpret, **tests_path}))
    parts += [
        Part("kernels", [py, "benchmarks/kernels.py", "--out", str(work / "kernels.json"),
                         *(["--smoke", "--no-compile", "--sections", "token_logprobs"] if dry_run
                           else ["--no-compile", "--iters", "3"])], 150, dict(interpret)),
        Part("step", [py, "benchmarks/step.py", "--out", str(work / "step.json"),
                      *(["--smoke"] if dry_run else ["--models", "qwen2_5_vl_3b_text", "--samples", "32"])], 120,
             dict(interpret)),
        # the same model as the trainer parts; the GPU work: 16 prompts x 8 samples x 256 tokens (a steady step is
        # a few seconds of generation and a real update), one run per framework
        Part("e2e", [py, "benchmarks/e2e.py", "--out", str(work / "e2e.json"), "--model", str(model_dir),
                     "--frameworks", "srpo_hf", "trl_hf",
                     *(["--smoke", "--threads", "1"] if dry_run else
                       ["--gpu", "--prompts", "16", "--n", "8", "--tokens", "256", "--steps", "3", "--repeats", "1",
                        "--timeout-s", "100"])], 150, dict(interpret)),
    ]
    return parts


def prepare_model(work: Path, dry_run: bool) -> Path:
    """The trainer parts' model: the tiny kit itself (dry run), or its VL model with 4 Qwen2.5-VL-3B-shaped language
    layers (hidden 2048, MLP 11008, 16 heads, 2 KV heads) in bf16."""
    from srpo_fast.tiny import build_widened_vl_model, ensure_tiny_kit

    kit = ensure_tiny_kit(work / "tiny_kit", seed=0)
    target = work / "model"
    if dry_run:
        shutil.copytree(kit["vl"], target, dirs_exist_ok=True)
    else:
        build_widened_vl_model(kit["vl"], target, hidden=2048, intermediate=11008, layers=4, heads=16, kv_heads=2)
    return target


# -------------------------------------------------------------------------------------------------- the results
def read_results(part: Part, out: Path, work: Path) -> None:
    """Attach what each part produced to it (parsed), and copy the trainer's metrics next to the summary."""
    try:
        if part.name == "env" and part.status == "ok":
            part.result = json.loads(part.tail.strip().splitlines()[-1])
        elif part.name == "pytest" and (work / "pytest_gpu.xml").is_file():
            suite = ET.parse(work / "pytest_gpu.xml").getroot()
            suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
            counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
            counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
            failed = [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
                      if case.find("failure") is not None or case.find("error") is not None]
            part.result = {**counts, "failed": failed}
        elif part.name in ("kernels", "step", "e2e") and (work / f"{part.name}.json").is_file():
            shutil.copy2(work / f"{part.name}.json", out / f"{part.name}.json")
            data = json.loads((out / f"{part.name}.json").read_text())
            part.result = ({"targets": data.get("targets"), "copy_bandwidth_GBps": data.get("copy_bandwidth_GBps")}
                           if part.name == "kernels" else _step_summary(data) if part.name == "step"
                           else _e2e_summary(data))
        elif part.name.startswith("train"):
            metrics = work / part.name / "metrics.jsonl"
            if metrics.is_file():  # every logged metric, in the summary JSON (few files come back from a lease)
                part.result = {"steps": [json.loads(line) for line in metrics.read_text().splitlines()
                                         if line.strip()]}
    except (OSError, ValueError, json.JSONDecodeError, ET.ParseError) as exc:
        part.result = {"unreadable": f"{type(exc).__name__}: {exc}"}


def _step_summary(data: dict) -> dict:
    out = {}
    for name, r in data.get("results", {}).items():
        out[name] = {"speedup_packed_vs_padded": r.get("speedup"), "attention_backend": r.get("attention_backend"),
                     **{f"{v}_{k}": r.get(v, {}).get(k) for v in ("packed", "padded")
                        for k in ("tokens_per_s", "mfu", "peak_mem_GB", "oom")}}
    return out


def _e2e_summary(data: dict) -> dict:
    """Per framework: unavailable (why), failed (errors), or its medians, the update's MFU included."""
    out: dict = {"device": data.get("device"), "work": data.get("work"), "ratios": data.get("ratios", {})}
    for name, s in data.get("summary", {}).items():
        if "unavailable" in s:
            out[name] = {"unavailable": s["unavailable"]}
        elif "step_s" not in s:
            out[name] = {"errors": s.get("errors")}
        else:
            out[name] = {k: s[k]["median"] for k in ("step_s", "generation_s", "rest_s", "update_s", "tokens_per_s",
                                                     "update_tflops", "update_mfu", "peak_gpu_mem_gb") if k in s}
    return out


def markdown(summary: dict) -> str:
    env = next((p["result"] for p in summary["parts"] if p["name"] == "env" and p["result"]), {}) or {}
    lines = [f"# GPU check ({summary['mode']})", "",
             f"{env.get('gpu', 'no GPU')} · driver {env.get('driver', '-')} · torch {env.get('torch', '?')} "
             f"(CUDA {env.get('torch_cuda')}) · triton {env.get('packages', {}).get('triton')} · transformers "
             f"{env.get('packages', {}).get('transformers')} · Python {env.get('python')} · flash-attn 2: "
             f"{env.get('flash_attn_2_usable')} · torch varlen: {env.get('torch_varlen_attn')}", "",
             f"Total {summary['total_s']:.0f} s.", "", "| part | status | seconds | result |", "|---|---|---|---|"]
    for p in summary["parts"]:
        lines.append(f"| {p['name']} | {p['status']} | {p['seconds']:.0f} | {_brief(p)} |")
    failed = [p for p in summary["parts"] if p["status"] != "ok"]
    for p in failed:
        lines += ["", f"## {p['name']}: {p['status']}", "```", p["tail"][-1500:], "```"]
    return "\n".join(lines) + "\n"


def _brief(part: dict) -> str:
    r = part.get("result") or {}
    if part["name"] == "pytest" and "tests" in r:
        return f"{r['passed']} passed, {r['failures'] + r['errors']} failed, {r['skipped']} skipped"
    if part["name"] == "kernels" and r.get("targets"):
        return ", ".join(f"{k}: {v.get('met')}" for k, v in r["targets"].items())
    if part["name"] == "step":
        return "; ".join(f"{k}: packed/padded {v.get('speedup_packed_vs_padded') or 0:.2f}x, MFU "
                         f"{(v.get('packed_mfu') or 0) * 100:.1f}%" for k, v in r.items())
    if part["name"] == "e2e" and r.get("work"):
        return "; ".join(_e2e_brief(name, v) for name, v in r.items() if name not in ("device", "work", "ratios"))
    if part["name"].startswith("train") and r.get("steps"):
        last = r["steps"][-1]
        return (f"{len(r['steps'])} steps, last {last.get('timing/step_s', 0):.1f} s, peak "
                f"{last.get('perf/gpu_mem_peak_GB', 0):.1f} GB, grad norm {last.get('loss/grad_norm', 0):.3g}")
    return ""


def _e2e_brief(name: str, v: dict) -> str:
    if "unavailable" in v:
        return f"{name}: not available ({v['unavailable'][:80]})"
    if "step_s" not in v:
        return f"{name}: failed"
    parts = [f"generation {v['generation_s']:.2f} s"] if "generation_s" in v else []
    if "update_s" in v:
        parts.append(f"update {v['update_s']:.2f} s")
    if v.get("update_mfu") is not None:
        parts.append(f"update MFU {v['update_mfu'] * 100:.1f}%")
    return f"{name}: {v['step_s']:.2f} s/step ({', '.join(parts)})"


def run_check(out: Path, dry_run: bool, only: set[str] | None = None, budget_s: float = 470.0) -> dict:
    """Run the parts in order within budget_s seconds in all (each also within its own limit); write the summaries."""
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    start = time.perf_counter()
    parts = build_parts(out, work, dry_run)
    if only:
        parts = [p for p in parts if p.name in only]
    if any(p.name.startswith("train") or p.name == "e2e" for p in parts):
        prepare_model(work, dry_run)
    for part in parts:
        left = budget_s - (time.perf_counter() - start)
        if left < 20:  # not worth starting: say so instead of overrunning the caller's limit
            part.status, part.tail = "skipped", f"[not started: the check's {budget_s:.0f} s budget is spent]"
            print(f"[gpu_check] {part.name}: skipped (budget)", flush=True)
            continue
        part.timeout_s = min(part.timeout_s, left)
        run_part(part)
        read_results(part, out, work)
    summary = {"mode": "dry-run (CPU, tiny shapes)" if dry_run else "GPU", "total_s": time.perf_counter() - start,
               "parts": [asdict(p) for p in parts]}
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "gpu_check.md").write_text(markdown(summary))
    shutil.rmtree(work, ignore_errors=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None,
                        help="results dir (default: $OUT when set, else benchmarks/results/gpu)")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, same parts (what the tests run)")
    parser.add_argument("--only", default=None, help="comma-separated subset of the parts")
    parser.add_argument("--budget-s", type=float, default=470.0,
                        help="seconds for the whole check (parts that would start later are skipped)")
    parser.add_argument("--part", choices=["env"], help=argparse.SUPPRESS)  # a child's job
    args = parser.parse_args(argv)
    if args.part == "env":
        print(json.dumps(environment()))
        return 0
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # so run_part can clean up
    out = args.out or Path(os.environ.get("OUT") or REPO / "benchmarks" / "results" / "gpu")
    summary = run_check(out, args.dry_run, set(args.only.split(",")) if args.only else None, args.budget_s)
    print((out / "gpu_check.md").read_text())
    return 0 if all(p["status"] == "ok" for p in summary["parts"]) else 1


if __name__ == "__main__":
    sys.exit(main())
