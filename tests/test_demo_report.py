"""The demo's verdict (srpo_fast/demo_report.py): the trend t separates a rising reward from a flat noisy one, and
the summary and summary.png come from real metrics files."""
import json
import random

import pytest

from srpo_fast.demo_report import report, reward_trend, summarize


def _noisy(slope: float, steps: int, seed: int, noise: float = 0.1) -> list[float]:
    rng = random.Random(seed)
    return [0.5 + slope * s + rng.gauss(0.0, noise) for s in range(1, steps + 1)]


def test_trend_t_separates_learning_from_noise():
    steps = list(range(1, 41))
    flat = [reward_trend(steps, _noisy(0.0, 40, seed))["t"] for seed in range(50)]
    assert sum(abs(t) >= 4 for t in flat) == 0  # a policy that does not change never passes t >= 4
    assert sum(abs(t) < 2.1 for t in flat) >= 45  # and is mostly inside the t distribution's 95% band
    rising = [reward_trend(steps, _noisy(0.01, 40, seed))["t"] for seed in range(20)]
    assert min(rising) > 4  # +0.4 over 40 steps against per-step noise 0.1


def test_trend_matches_the_closed_form_on_a_line():
    trend = reward_trend([1, 2, 3, 4], [1.0, 3.0, 5.0, 7.5])
    assert trend["slope"] == pytest.approx(2.15)  # least-squares slope: Sxy / Sxx = 10.75 / 5
    resid = [0.1, -0.05, -0.2, 0.15]  # y minus the fit 4.125 + 2.15 (x - 2.5)
    assert trend["se"] == pytest.approx((sum(r * r for r in resid) / 2 / 5) ** 0.5)
    with pytest.raises(ValueError, match="at least 3 steps"):
        reward_trend([1, 2], [0.0, 1.0])


def test_summary_and_png_from_metrics_files(tmp_path):
    (tmp_path / "sft").mkdir()
    (tmp_path / "grpo").mkdir()
    (tmp_path / "sft" / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "loss/nll": 10.0 / s}) + "\n" for s in range(1, 6)))
    rows = [{"step": 0, "val/acc_first": 0.2, "val/acc_final": 0.4, "val/reflect_rate": 0.9}]
    for s, r in enumerate(_noisy(0.02, 20, 0), start=1):
        rows.append({"step": s, "reward/total": r, "reward/format": 0.25 + 0.01 * s, "reward/accuracy": r / 3})
    rows[-1].update({"val/acc_first": 0.6, "val/acc_final": 0.7, "val/reflect_rate": 1.0})
    (tmp_path / "grpo" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    summary, text, png = report(tmp_path)
    assert summary["k"] == 4 and summary["val/acc_first"][:2] == (0.2, 0.6)
    assert summary["well_formed"] == pytest.approx((2 * (0.25 + 0.025), 2 * (0.25 + 0.185)))
    assert summary["trend"]["t"] > 4
    assert "val first-answer accuracy    0.20 → 0.60" in text and "t = " in text
    assert png is not None and png.stat().st_size > 10_000
    assert summarize([], rows)["trend"]["steps"] == 20
