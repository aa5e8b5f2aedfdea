"""One engine settings type (srpo_fast.config.EngineSettings) for train, distill and eval, and one factory: the same
settings give the same engine config from every entry point, sizes and dtypes convert one way, bad values name
their dotted key, and the factory starts the engine the settings name."""
import pytest
import torch

from srpo_fast.config import ConfigError, EngineSettings, load_config
from srpo_fast.distill.config import load_distill_config
from srpo_fast.rollout import HFEngine, build_engine, engine_config

SHARED = {"engine": "hf", "dtype": "float32", "max_model_len": 1024, "max_num_seqs": 8,
          "gpu_memory_utilization": 0.3, "kv_cache_gb": 0.03125, "enforce_eager": True, "hf_batch_size": 4}


def test_train_distill_and_eval_settings_give_the_same_engine_config(tmp_path):
    from srpo_fast.eval.runner import EvalSettings

    overrides = [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in SHARED.items()]
    train = load_config(None, [f"rollout.{o}" for o in overrides] + ["rollout.max_tokens=64",
                                                                       "data.max_prompt_tokens=512"]).rollout
    distill = load_distill_config(None, [f"policy.{o}" for o in overrides] + [f"teacher.local.{o}" for o in overrides])
    (tmp_path / "data.jsonl").write_text("")
    evaluation = EvalSettings(model=tmp_path, benchmark="mathvista", data=tmp_path / "data.jsonl", out=tmp_path,
                              **SHARED)
    configs = [engine_config(s, "m") for s in (train, distill.policy, distill.teacher.local, evaluation)]
    assert all(c == configs[0] for c in configs)
    assert configs[0].kv_cache_bytes == 32 << 20 and configs[0].dtype == "float32"
    assert configs[0].max_num_seqs == 8 and configs[0].hf_batch_size == 4 and configs[0].enforce_eager
    # per-entry-point options win over the shared settings
    assert engine_config(train, "m", dtype="bfloat16", seed=3).dtype == "bfloat16"


def test_null_dtype_and_size_defaults():
    config = engine_config(EngineSettings(), "m")
    assert config.dtype == ("bfloat16" if torch.cuda.is_available() else "float32")
    assert config.kv_cache_bytes is None and config.gpu_memory_utilization == 0.5
    cfg = load_config(None, ["model.dtype=bfloat16"])
    from srpo_fast.train.grpo import engine_options, rollout_dtype

    assert rollout_dtype(cfg) == "bfloat16" and engine_options(cfg)["dtype"] == "bfloat16"  # the policy's dtype
    assert rollout_dtype(load_config(None, ["model.dtype=bfloat16", "rollout.dtype=float16"])) == "float16"


@pytest.mark.parametrize("section,key,value,match", [
    ("rollout", "engine", "sglang", "rollout.engine must be one of"),
    ("rollout", "kv_cache_gb", "0", "rollout.kv_cache_gb must be > 0"),
    ("rollout", "gpu_memory_utilization", "1.5", "rollout.gpu_memory_utilization must be in"),
    ("policy", "dtype", "int8", "policy.dtype must be one of"),
    ("teacher.local", "max_num_seqs", "0", "teacher.local.max_num_seqs must be > 0"),
    ("policy", "backend", "hf", "unknown config key policy.backend"),
])
def test_bad_engine_settings_name_their_key(section, key, value, match):
    load = load_config if section == "rollout" else load_distill_config
    with pytest.raises(ConfigError, match=match):
        load(None, [f"{section}.{key}={value}"])


def test_settings_built_in_code_name_the_class():
    with pytest.raises(ValueError, match="EngineSettings.hf_batch_size must be > 0"):
        EngineSettings(hf_batch_size=0)


def test_factory_starts_the_engine_the_settings_name(tiny_kit):
    engine = build_engine(EngineSettings(engine="hf", dtype="float32", max_model_len=256, hf_batch_size=2),
                          tiny_kit["text"], seed=5)
    assert isinstance(engine, HFEngine)
    assert engine.config.hf_batch_size == 2 and engine.config.seed == 5 and engine.config.max_model_len == 256
