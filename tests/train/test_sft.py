"""Stage 1 SFT (`python -m srpo_fast.train train.stage=sft`): the encoder builds the prompt exactly as the rollout
engines do and the target as response + <|im_end|>; the NLL falls on a small reflection set; bad records are
counted, not dropped silently."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from srpo_fast.data.records import load_records
from srpo_fast.data.synthetic import make_dataset, write_dataset

ROOT = Path(__file__).resolve().parent.parent.parent


def reflection_response(record: dict) -> str:
    wrong = "0" if record["answer"] != "0" else "1"
    return (f"<think>I read the image quickly.</think><answer>{wrong}</answer><reflection>The first answer "
            f"misread the image; look again.</reflection><think>Looking again carefully.</think>"
            f"<answer>{record['answer']}</answer>")


def write_sft_set(out: Path, n: int, bad: int = 0) -> Path:
    records = make_dataset(n, seed=3)
    path = write_dataset(records, out)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for i, row in enumerate(rows):
        row["response"] = "" if i < bad else reflection_response(row)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_encoder_matches_the_rollout_prompt_and_appends_end_of_turn(tiny_kit, tmp_path):
    from srpo_fast.data.prompts import build_messages
    from srpo_fast.models.processor import load_processor
    from srpo_fast.rollout import HFEngine, RolloutEngineConfig, RolloutRequest, SamplingConfig
    from srpo_fast.train.sft import SFTEncoder

    records, _ = load_records([write_sft_set(tmp_path / "data", 2)])
    processor = load_processor(tiny_kit["vl"])
    encoder = SFTEncoder(processor, template="srpo", max_prompt_tokens=1000)
    sample = encoder.encode(0, records[0])
    engine = HFEngine(RolloutEngineConfig(model=tiny_kit["vl"], dtype="float32"))
    rolled = engine.generate([RolloutRequest(messages=build_messages(records[0], "srpo"),
                                             images=records[0]["images"])],
                             SamplingConfig(temperature=0.0, max_tokens=2)).samples[0]
    assert sample.prompt_ids.tolist() == rolled.prompt_ids
    assert sample.pixel_values.equal(rolled.image_inputs.pixel_values)
    tokenizer = processor.tokenizer
    assert tokenizer.decode(sample.response_ids) == records[0]["response"] + "<|im_end|>"
    with pytest.raises(ValueError, match="no 'response'"):
        encoder.encode(1, {**records[1], "response": ""})
    with pytest.raises(ValueError, match="max_prompt_tokens"):
        SFTEncoder(processor, template="srpo", max_prompt_tokens=8).encode(1, records[1])
    limit = len(sample.response_ids)  # data.max_response_tokens: the target, end of turn included
    assert SFTEncoder(processor, template="srpo", max_prompt_tokens=1000,
                      max_response_tokens=limit).encode(0, records[0]).response_ids.equal(sample.response_ids)
    with pytest.raises(ValueError, match="max_response_tokens"):
        SFTEncoder(processor, template="srpo", max_prompt_tokens=1000,
                   max_response_tokens=limit - 1).encode(0, records[0])


def test_sft_run_lowers_the_nll_and_counts_bad_records(tiny_kit, tmp_path):
    data = write_sft_set(tmp_path / "data", 8, bad=1)
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    args = [sys.executable, "-m", "srpo_fast.train", "train.stage=sft", f"model.path={tiny_kit['vl']}",
            f"data.train_files=[{data}]", f"train.output_dir={out}", "train.prompts_per_step=8", "train.epochs=6",
            "train.lr=3e-3", "data.shuffle=false", "log.progress=false", "log.tensorboard=off",
            "train.save_every=3"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(r["data/skipped_records"] == 1 and r["train/sequences"] == 7 for r in rows)
    assert rows[-1]["loss/nll"] < 0.7 * rows[0]["loss/nll"], [r["loss/nll"] for r in rows]
    assert (out / "final_model" / "model.safetensors").is_file()

    proc = subprocess.run([sys.executable, "-m", "srpo_fast.train", "train.stage=sft",
                           f"model.path={tiny_kit['vl']}", f"train.output_dir={tmp_path / 'none'}"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert proc.returncode != 0 and "needs data.train_files" in proc.stderr
