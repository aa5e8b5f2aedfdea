"""The one way from user-facing engine settings (`srpo_fast.config.EngineSettings`: the trainer's `rollout` section,
distill's `policy` / `teacher.local`, eval's options) to a running engine."""
from __future__ import annotations

from pathlib import Path

import torch

from srpo_fast.config import EngineSettings

from .types import RolloutEngine, RolloutEngineConfig


def default_dtype() -> str:
    return "bfloat16" if torch.cuda.is_available() else "float32"


def engine_config(settings: EngineSettings, model: str | Path, **options) -> RolloutEngineConfig:
    """The engine's full config: `settings`, then `options` (further RolloutEngineConfig fields: prompt limits,
    image bounds, seed, ...; they win over the settings). A null dtype becomes `default_dtype()`."""
    values = dict(dtype=settings.dtype or default_dtype(), max_model_len=settings.max_model_len,
                  max_num_seqs=settings.max_num_seqs, gpu_memory_utilization=settings.gpu_memory_utilization,
                  kv_cache_bytes=None if settings.kv_cache_gb is None else int(settings.kv_cache_gb * (1 << 30)),
                  enforce_eager=settings.enforce_eager, hf_batch_size=settings.hf_batch_size)
    values.update(options)
    return RolloutEngineConfig(model=model, **values)


def build_engine(settings: EngineSettings, model: str | Path, **options) -> RolloutEngine:
    """A VLLMEngine or HFEngine (settings.engine) for `model`; vLLM is imported only for the vLLM engine."""
    config = engine_config(settings, model, **options)
    if settings.engine == "hf":
        from .hf_engine import HFEngine

        return HFEngine(config)
    from .vllm_engine import VLLMEngine

    return VLLMEngine(config)
