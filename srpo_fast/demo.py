"""The README's main job: SRPO's two stages on the embedded default (tiny offline Qwen2.5-VL, synthetic task, CPU).

    python -m srpo_fast.demo [--out DIR] [--sft key=value ...] [key=value ...]

1. a scripted reflection cold-start set for the synthetic task (data/cold_start.py) → DIR/cold_start/
2. stage 1, SFT on it (configs/demo_sft_cpu.yaml)                                      → DIR/sft/
3. stage 2, reflection-aware GRPO from the SFT model (configs/demo_cpu.yaml)           → DIR/grpo/
4. the verdict: start → end numbers and the reward trend's t printed, one picture      → DIR/summary.png
   (srpo_fast/demo_report.py says how t is computed)
Both stages are the real trainer (`srpo_fast.train`), in this one process; rerunning resumes where it stopped.
A stop signal (SIGTERM, Ctrl-C) during stage 1 ends the demo after stage 1's checkpoint: stage 2 needs the finished
SFT model. Plain overrides go to stage 2, `--sft` ones to stage 1.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from srpo_fast.config import ConfigError, load_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
EXIT_STOPPED = 143  # 128 + SIGTERM, as a shell reports a process stopped by it
# The demo's cold-start set (data/cold_start.py says what each knob does). 80% of the wrong first-answer guesses
# become the gold's neighbour, so SFT wires the image into the first answer (greedy, it names the neighbour) and
# GRPO corrects the mapping by step ~10-30: with uniform guesses alone seed 0's first answer did not start to learn
# in 50 steps (seed 1's by step 10), and at 50% seed 0 waited until step ~66. The scripted teacher calls orange
# "yellow" and purple "blue" 70% of the time, so after SFT the final answer is wrong on most orange and purple
# shapes and GRPO has it to fix; with a perfect teacher the final accuracy starts at its ceiling (1.00).
NEIGHBOUR_FIRST = 0.8
TEACHER_MISTAKES = {"orange": "yellow", "purple": "blue"}
MISTAKE_RATE = 0.7


def write_cold_start(out: Path, size: int, seed: int, tasks: tuple[str, ...], difficulty: int) -> Path:
    """DIR/data.jsonl + images, written once (a complete file is never rewritten)."""
    path = out / "data.jsonl"
    if path.is_file():
        return path
    from srpo_fast.data.cold_start import add_cold_start_responses
    from srpo_fast.data.synthetic import make_dataset, write_dataset

    records = add_cold_start_responses(make_dataset(size, seed=seed + 1, difficulty=difficulty, tasks=tasks), seed=seed,
                                       guess_first=True, neighbour_first=NEIGHBOUR_FIRST,
                                       teacher_mistakes=TEACHER_MISTAKES, mistake_rate=MISTAKE_RATE)
    written = write_dataset([{k: v for k, v in r.items() if k != "response"} for r in records], out)
    rows = [json.loads(line) for line in written.read_text().splitlines()]
    for row, record in zip(rows, records):
        row["response"] = record["response"]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
    tmp.replace(path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m srpo_fast.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/demo_cpu", help="run dir (default: runs/demo_cpu)")
    parser.add_argument("--sft", action="append", default=[], metavar="KEY=VALUE", help="stage-1 override")
    parser.add_argument("overrides", nargs="*", help="stage-2 overrides, e.g. rollout.n=8")
    args = parser.parse_intermixed_args(argv)  # stage-2 overrides may come before, between or after --sft ones
    out = Path(args.out)
    try:
        sft_cfg = load_config(CONFIGS / "demo_sft_cpu.yaml", [f"train.output_dir={out / 'sft'}", *args.sft])
        data = write_cold_start(out / "cold_start", sft_cfg.data.synthetic_size, sft_cfg.train.seed,
                                tuple(sft_cfg.data.synthetic_tasks), sft_cfg.data.synthetic_difficulty)
        sft_cfg = load_config(CONFIGS / "demo_sft_cpu.yaml",
                              [f"train.output_dir={out / 'sft'}", f"data.train_files=[{data}]", *args.sft])
        grpo_cfg = load_config(CONFIGS / "demo_cpu.yaml", [f"model.path={out / 'sft' / 'final_model'}",
                                                           f"train.output_dir={out / 'grpo'}", *args.overrides])
        if not sft_cfg.train.export_final:
            raise ConfigError("--sft train.export_final=false: stage 2 starts from stage 1's exported model")
    except ConfigError as exc:
        print(f"config error: {exc}")
        return 2
    from srpo_fast.train.__main__ import EXIT_NO_UPDATE, EXIT_STORAGE
    from srpo_fast.train.grpo import train_grpo
    from srpo_fast.train.run import FINAL_MODEL, NoUpdateError
    from srpo_fast.train.sft import train_sft
    from srpo_fast.utils.checkpoint import StorageError
    from srpo_fast.utils.distributed import cleanup, init_distributed

    init_distributed()
    try:
        print(f"[demo] stage 1: SFT on the cold-start set {data}")
        sft_dir = train_sft(sft_cfg)
        if not (sft_dir / FINAL_MODEL).is_dir():  # stopped by a signal before its last step
            print("[demo] stage 1 stopped before its end; stage 2 not started. Rerun the same command to resume.")
            return EXIT_STOPPED
        print("[demo] stage 2: reflection-aware GRPO from the SFT model")
        grpo_dir = train_grpo(grpo_cfg)
        if grpo_cfg.train.export_final and not (grpo_dir / FINAL_MODEL).is_dir():
            print("[demo] stage 2 stopped before its end. Rerun the same command to resume.")
            return EXIT_STOPPED
    except NoUpdateError as exc:
        print(f"[demo] error: {exc}")
        return EXIT_NO_UPDATE
    except StorageError as exc:
        print(f"[demo] storage error: {exc.strerror or exc}")
        return EXIT_STORAGE
    finally:
        cleanup()
    from srpo_fast.demo_report import report

    _, text, png = report(out)
    print(text)
    print(f"[demo] done: {png or 'no summary.png (plotting needs matplotlib)'}; metrics in "
          f"{out / 'sft' / 'metrics.jsonl'} and {out / 'grpo' / 'metrics.jsonl'}, "
          f"model in {out / 'grpo' / 'final_model'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
