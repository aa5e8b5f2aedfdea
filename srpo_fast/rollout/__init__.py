"""Rollout engines behind one protocol (types.py): a colocated vLLM engine with in-place weight sync, and an HF
`generate` fallback. Engines import vLLM / build models only when constructed.

    engine = VLLMEngine(RolloutEngineConfig(model=path, ...))      # or HFEngine(config)
    engine = build_engine(EngineSettings(engine="vllm", ...), path)  # from the user-facing settings (factory.py)
    rollouts = engine.generate([RolloutRequest(messages=..., images=[img])], SamplingConfig(n=8, temperature=1.0))
    engine.sleep(); ...train...
    engine.wake_up(["weights"]); engine.update_weights(buckets); engine.wake_up(["kv_cache"])
"""
from srpo_fast.config import EngineSettings

from .factory import build_engine, engine_config
from .hf_engine import HFEngine
from .types import (EngineFailure, ImageInputs, InvalidRequestError, RolloutEngine, RolloutEngineConfig,
                    RolloutRequest, Rollouts, RolloutSample, SamplingConfig, WeightSyncError, WeightSyncStats)
from .vllm_engine import VLLMEngine
from .weights import bucket_by_bytes, iter_weight_pairs

__all__ = ["EngineFailure", "EngineSettings", "HFEngine", "ImageInputs", "InvalidRequestError", "RolloutEngine",
           "RolloutEngineConfig", "RolloutRequest", "RolloutSample", "Rollouts", "SamplingConfig", "VLLMEngine",
           "WeightSyncError", "WeightSyncStats", "bucket_by_bytes", "build_engine", "engine_config",
           "iter_weight_pairs"]
