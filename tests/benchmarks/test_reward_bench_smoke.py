"""benchmarks/reward.py --smoke runs end to end and writes a well-formed report."""
import math
import os

from bench_run import run_benchmark


def test_reward_benchmark_smoke(tmp_path):
    out = tmp_path / "reward.json"
    data = run_benchmark("reward.py", "--smoke", "--workers", "2", out=out)
    assert data["benchmark"] == "reward_smoke" and data["smoke"] is True
    assert data["count"] == 32 and data["workers"] == 2 and data["cpu_count"] == os.cpu_count()
    assert data["pool_cold_start_s"] > 0
    for mix in ("fast", "mixed"):
        for preset in ("paper", "official"):
            r = data["results"][mix][preset]
            for key in ("median_ms", "parse_ms", "fast_path_ms", "math_verify_ms", "compose_ms"):
                assert math.isfinite(r[key]) and r[key] >= 0, (mix, preset, key)
            assert r["median_ms"] > 0 and r["answers_graded"] > 32 and r["timeouts"] == 0
            assert 0 <= r["first_accuracy"] <= 1
    assert data["results"]["fast"]["paper"]["math_verify_items"] == 0  # the fast mix never needs math-verify
    mixed = data["results"]["mixed"]["paper"]
    assert mixed["math_verify_items"] > 0 and 0 < mixed["math_verify_share"] < 1
