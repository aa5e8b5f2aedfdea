"""benchmarks/step.py --smoke runs end to end on CPU: packed and padded steps score the same tokens to the same
log-probs, and the report is well formed."""
import math

import pytest

from bench_run import run_benchmark


def test_step_benchmark_smoke(tmp_path):
    out = tmp_path / "step.json"
    data = run_benchmark("step.py", "--smoke", out=out)
    assert data["benchmark"] == "step_smoke" and data["smoke"] is True and data["device"] == "cpu"
    result = data["results"]["tiny_text"]
    budget = data["max_tokens_per_microbatch"]
    assert result["attention_backend"] == "sdpa_segments" and result["dtype"] == "float32"
    # both variants computed the log-probs of the same response tokens (fp32: equal to rounding)
    assert result["logp_sum_rel_diff"] <= 1e-5
    assert math.isclose(result["packed"]["logp_sum"], result["padded"]["logp_sum"], rel_tol=1e-5)
    packed, padded = result["packed"], result["padded"]
    assert sum(packed["row_tokens"]) == result["real_tokens"] and max(packed["row_tokens"]) <= budget
    assert packed["microbatches"] == len(packed["row_tokens"]) <= padded["microbatches"]
    assert padded["computed_tokens"] >= result["real_tokens"]
    waste = result["padding_waste_avoided"]
    assert waste["tokens"] == padded["computed_tokens"] - result["real_tokens"]
    assert math.isclose(waste["fraction_of_padded"], padded["padding_fraction"])
    for variant in (packed, padded):
        assert variant["step_ms"] > 0 and variant["peak_mem_GB"] > 0 and variant["mfu"] is None
        assert math.isclose(variant["tokens_per_s"], result["real_tokens"] / (variant["step_ms"] / 1e3))
        assert math.isclose(variant["tflops"], result["model_tflop_per_step"] / (variant["step_ms"] / 1e3))
    assert math.isclose(result["speedup"], packed["tokens_per_s"] / padded["tokens_per_s"])


@pytest.mark.slow
def test_step_benchmark_scaling_reports_cost_per_real_token(tmp_path):
    """--scaling: one run per step size on the full-length mix; cost per real token per variant and its spread."""
    out = tmp_path / "scaling.json"
    data = run_benchmark("step.py", "--scaling", "--sizes", "600", "1500", "--max-tokens", "2048", "--iters", "2",
                         "--min-round-s", "0.3", out=out, timeout=600)
    assert data["benchmark"] == "step_scaling" and data["sizes"] == [600, 1500]
    assert list(data["results"]) == ["600", "1500"]
    for size, result in data["results"].items():
        assert result["real_tokens"] >= int(size)
        assert result["logp_sum_rel_diff"] <= 1e-5
        for variant in ("packed", "padded"):
            assert math.isclose(result[variant]["us_per_real_token"], 1e6 / result[variant]["tokens_per_s"])
        ratio = result["packed"]["step_ms"] / result["padded"]["step_ms"]
        assert math.isclose(result["packed_over_padded_time"], ratio)
        mix = result["length_mix"]
        assert mix["length_weighted_mean_tokens"] >= result["real_tokens"] / mix["samples"]  # sum L^2 / sum L >= mean
        assert math.isclose(mix["response_fraction"], result["response_tokens"] / result["real_tokens"])
        for variant in ("packed", "padded"):
            r = result[variant]
            # interleaved rounds, short steps repeated within a round: at least one run per round
            assert r["timed_runs"] >= 2 and r["min_ms"] <= r["step_ms"] <= r["max_ms"]
            assert math.isclose(r["us_per_model_gflop"], r["step_ms"] * 1e3 / (result["model_tflop_per_step"] * 1e3))
    assert len(data["load_average_1min"]["per_round"]) == 3  # before the first round and after each
    for variant in ("packed", "padded"):
        costs = data["cost_spread"][variant]["us_per_real_token"]
        assert costs == [r[variant]["us_per_real_token"] for r in data["results"].values()]
        assert math.isclose(data["cost_spread"][variant]["max_over_min"], max(costs) / min(costs))
