"""Loading the policy from a local HF dir: Qwen2.5-VL, Qwen2-VL or text-only Qwen2, with parts frozen by config.

The kind is read from config.json's model_type, so a wrong dir fails before any weights are read. Freezing follows
SRPO's recipe (vision tower frozen; the projector — the vision merger — trainable unless configured otherwise).
Gradient checkpointing uses the non-reentrant variant: it works with frozen inputs, FSDP2 and kwargs-only calls.

The trainer never asks the model for logits: `output_head` gives the LM head's weight/bias and `backbone` the module
whose output is the final (normed) hidden state, so log-probs come from `kernels.linear_token_logprobs` without an
[N, V] tensor (see models/forward.py).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .attention import ATTN_NAME, attn_implementation_for, has_cuda_varlen_kernel, use_varlen_vision_attention

log = logging.getLogger(__name__)

VL_MODEL_TYPES = ("qwen2_5_vl", "qwen2_vl")
SUPPORTED_MODEL_TYPES = VL_MODEL_TYPES + ("qwen2",)
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64}


def _model_class(model_type: str):
    import transformers

    return {"qwen2_5_vl": transformers.Qwen2_5_VLForConditionalGeneration,
            "qwen2_vl": transformers.Qwen2VLForConditionalGeneration,
            "qwen2": transformers.Qwen2ForCausalLM}[model_type]


def read_model_type(path: str | Path) -> str:
    """model_type from PATH/config.json; clear errors for a missing dir/config and unsupported kinds."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model dir not found: {path}")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} has no config.json; is it a Hugging Face model dir?")
    model_type = json.loads(config_file.read_text()).get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"unsupported model_type {model_type!r} in {config_file}; supported: "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    return model_type


def model_type_of(model: nn.Module) -> str:
    return getattr(getattr(model, "config", None), "model_type", type(model).__name__)


def is_vision_language(model: nn.Module) -> bool:
    return model_type_of(model) in VL_MODEL_TYPES


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating dtype, got {dtype}")
        return dtype
    if isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype]
    raise TypeError(f"dtype must be a torch.dtype or one of {sorted(_DTYPES)}, got {dtype!r}")


def backbone(model: nn.Module) -> nn.Module:
    """The module under the LM head (Qwen2Model / Qwen2_5_VLModel / Qwen2VLModel): output[0] is the final, normed
    hidden state [B, L, H]."""
    prefix = getattr(model, "base_model_prefix", "model")
    inner = getattr(model, prefix, None)
    if not isinstance(inner, nn.Module) or inner is model:
        raise TypeError(f"{type(model).__name__} has no backbone at .{prefix}")
    return inner


def output_head(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight [V, H], bias [V] or None) of the LM head — tied to the input embedding when the config ties them."""
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise TypeError(f"{type(model).__name__}'s output head is {type(head).__name__}, not nn.Linear")
    return head.weight, head.bias


def vision_parts(model: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
    """(vision tower, projector) of a Qwen2(.5)-VL model: the projector is the tower's `merger`; (None, None) for
    a text model."""
    if not is_vision_language(model):
        return None, None
    tower = backbone(model).visual
    return tower, tower.merger


def freeze_vision_parts(model: nn.Module, *, vision: bool, projector: bool) -> None:
    """Set requires_grad on the vision tower (without the merger) and on the projector (the merger)."""
    tower, merger = vision_parts(model)
    if tower is None:
        return
    merger_ids = {id(p) for p in merger.parameters()}
    for param in tower.parameters():
        frozen = projector if id(param) in merger_ids else vision
        param.requires_grad_(not frozen)


@dataclass(frozen=True)
class ParameterCounts:
    trainable: int
    frozen: int
    vision_trainable: int
    vision_frozen: int

    @property
    def total(self) -> int:
        return self.trainable + self.frozen


def parameter_counts(model: nn.Module) -> ParameterCounts:
    """Trainable / frozen element counts, overall and within the vision tower (incl. the projector)."""
    tower, _ = vision_parts(model)
    vision_ids = {id(p) for p in tower.parameters()} if tower is not None else set()
    counts = {"trainable": 0, "frozen": 0, "vision_trainable": 0, "vision_frozen": 0}
    for param in model.parameters():
        key = "trainable" if param.requires_grad else "frozen"
        counts[key] += param.numel()
        if id(param) in vision_ids:
            counts["vision_" + key] += param.numel()
    return ParameterCounts(**counts)


def load_policy(path: str | Path, *, dtype: torch.dtype | str = torch.float32, attn_implementation: str = ATTN_NAME,
                freeze_vision: bool = True, freeze_projector: bool = False, gradient_checkpointing: bool = False,
                trust_remote_code: bool = False) -> nn.Module:
    """Load a Qwen2.5-VL / Qwen2-VL / Qwen2 causal LM from a local dir (never downloads) on CPU, whole.

    attn_implementation: "srpo_varlen" (packed rows; a VL model's vision tower too where a CUDA varlen kernel
    exists, else SDPA there), or any name transformers knows ("sdpa", "eager", "flash_attention_2", ...).
    freeze_vision / freeze_projector apply to VL models only. The model comes back in train mode with use_cache off;
    its `parameter_counts` are logged. For training under FSDP2, `models.sharded_loading.load_sharded_policy` reads
    only each rank's shards instead.
    """
    model_type = read_model_type(path)
    if not isinstance(attn_implementation, str):
        raise TypeError(f"attn_implementation must be a string, got {type(attn_implementation).__name__}")
    attention = attn_implementation_for(model_type, attn_implementation)
    model = _model_class(model_type).from_pretrained(Path(path), dtype=_as_dtype(dtype), attn_implementation=attention,
                                                     local_files_only=True, trust_remote_code=trust_remote_code)
    return prepare_policy(model, path, attn_implementation=attn_implementation, freeze_vision=freeze_vision,
                          freeze_projector=freeze_projector, gradient_checkpointing=gradient_checkpointing)


def prepare_policy(model: nn.Module, path: str | Path, *, attn_implementation: str, freeze_vision: bool,
                   freeze_projector: bool, gradient_checkpointing: bool) -> nn.Module:
    """What every loaded policy gets, whole or not yet materialized: no KV cache, the frozen parts, gradient
    checkpointing, the vision tower's varlen attention where it pays, train mode, a log line."""
    model.config.use_cache = False
    if hasattr(model.config, "text_config"):
        model.config.text_config.use_cache = False
    if attn_implementation == ATTN_NAME and has_cuda_varlen_kernel():
        use_varlen_vision_attention(model)
    freeze_vision_parts(model, vision=freeze_vision, projector=freeze_projector)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    counts = parameter_counts(model)
    log.info("loaded %s from %s: %d trainable / %d frozen parameters (vision tower: %d trainable / %d frozen)",
             model_type_of(model), path, counts.trainable, counts.frozen, counts.vision_trainable,
             counts.vision_frozen)
    return model
