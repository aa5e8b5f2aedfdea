"""Metrics jsonl, resume truncation, and the plot command."""
import json
import math
import subprocess
import sys

import pytest
import torch

from srpo_fast.utils.metrics import MetricsLogger, read_metrics


def test_jsonl_rows_and_tensor_values(tmp_path):
    with MetricsLogger(tmp_path, tensorboard="off") as log:
        log.log(1, {"reward/mean": torch.tensor(0.5), "loss": 1.25, "nan": math.nan, "flag": True})
        log.log(2, {"reward/mean": 0.75})
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["reward/mean"] == 0.5 and rows[0]["nan"] == "nan" and rows[0]["flag"] is True
    with pytest.raises(ValueError, match="one value"):
        MetricsLogger(tmp_path / "x", tensorboard="off").log(0, {"bad": torch.ones(2)})


def test_resume_drops_steps_to_be_redone_and_torn_lines(tmp_path):
    with MetricsLogger(tmp_path, tensorboard="off") as log:
        for step in range(1, 6):
            log.log(step, {"x": step})
    with (tmp_path / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 6, "x"')  # a crash mid-write
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    with MetricsLogger(tmp_path, tensorboard="off", resume_from_step=3) as log:
        log.log(4, {"x": 40})
    assert [(r["step"], r["x"]) for r in read_metrics(tmp_path / "metrics.jsonl")] == [(1, 1), (2, 2), (3, 3), (4, 40)]


def test_disabled_logger_writes_nothing(tmp_path):
    log = MetricsLogger(tmp_path / "rank1", enabled=False)
    assert log.log(1, {"x": 1})["x"] == 1
    assert not (tmp_path / "rank1").exists()


def test_plot_command_writes_one_png_per_group(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "reward/mean": s * 0.1, "reward/acc": 0.5,
                                        "timing/step_s": 1.0 + s, "note": "text"}) + "\n" for s in range(5)))
    result = subprocess.run([sys.executable, "-m", "srpo_fast.utils.plot", str(path), "--out", str(tmp_path / "p")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    pngs = sorted(p.name for p in (tmp_path / "p").glob("*.png"))
    assert pngs == ["reward.png", "timing.png"]
    assert all((tmp_path / "p" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for name in pngs)
