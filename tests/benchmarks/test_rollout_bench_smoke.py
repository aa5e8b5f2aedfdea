"""benchmarks/weight_sync.py --smoke runs end to end (module-copy sink always, the vLLM engine when installed) and
writes a well-formed report; the script itself checks that every variant left the sink equal to the source."""
import importlib.util
import math

from bench_run import run_benchmark


def test_weight_sync_benchmark_smoke(tmp_path):
    out = tmp_path / "weight_sync.json"
    data = run_benchmark("weight_sync.py", "--smoke", "--iters", "1", out=out)
    assert data["benchmark"] == "weight_sync_smoke" and data["smoke"] is True
    has_vllm = importlib.util.find_spec("vllm") is not None
    assert data["vllm_available"] is has_vllm
    expected = {"tiny_vl/module_copy"} | ({"tiny_vl/vllm_reload"} if has_vllm else set())
    assert set(data["results"]) == expected
    labels = {"per_param", "per_param_gather", "bucket_0.25MB", "bucket_0.25MB_ingest", "bucket_1MB",
              "bucket_1MB_ingest"}
    for result in data["results"].values():
        assert result["tensors"] == 57 and result["bytes"] > 1e6
        assert set(result["variants"]) == labels
        for v in result["variants"].values():
            assert v["seconds"] > 0 and math.isclose(v["GBps"], result["bytes"] / v["seconds"] / 1e9)
    assert data["copy_bandwidth_GBps"] > 0
