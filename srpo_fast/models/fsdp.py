"""FSDP2 (`fully_shard`) for Qwen2.5-VL / Qwen2-VL / Qwen2, plus the optimizer, clipping and LR schedule around it.

Sharding units: every module whose class transformers lists in `_no_split_modules` (decoder layers and vision
blocks), then the vision tower itself (patch embed + merger), then the root (embeddings, final norm, lm_head; tied
embeddings stay together there). Frozen parameters (e.g. a vision tower with requires_grad=False) are sharded like
the rest; they simply never get gradients.

Loss scaling contract (token-mean over the whole optimizer step, across ranks and micro-batches):

    global_tokens = all_reduce_sum(tokens in all of this rank's micro-batches)      # utils.distributed
    for mb in micro_batches:                     # every rank runs the SAME number of micro-batches
        (token_loss_sum(mb) / global_tokens).backward()
    clip_grad_norm(model, max_norm); optimizer.step(); optimizer.zero_grad()

With `gradient_reduction="sum"` (the default) FSDP sums gradients over ranks instead of averaging them, so the
accumulated gradient is exactly the gradient of the global token-mean loss, however unevenly tokens fall on ranks.
Averaging instead (FSDP's default, `gradient_reduction="mean"`) would need the loss multiplied by world size.
"""
from __future__ import annotations

import math
from typing import Literal
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor

_VISION_TOWER_PATHS = ("model.visual", "visual")


def vision_tower(model: nn.Module) -> nn.Module | None:
    """The vision encoder of a Qwen2(.5)-VL model (transformers 5 puts it at model.model.visual), None for text."""
    for path in _VISION_TOWER_PATHS:
        try:
            return model.get_submodule(path)
        except AttributeError:
            continue
    return None


def _sharding_units(model: nn.Module) -> list[nn.Module]:
    """Decoder layers and vision blocks (transformers' `_no_split_modules`), then the vision tower, in module order."""
    unit_classes = set(getattr(model, "_no_split_modules", None) or ())
    if not unit_classes:
        raise ValueError(f"model ({type(model).__name__}) names no _no_split_modules; cannot pick FSDP units")
    units = [m for m in model.modules() if m is not model and type(m).__name__ in unit_classes]
    if not units:
        raise ValueError(f"no submodule of {type(model).__name__} is one of {sorted(unit_classes)}")
    tower = vision_tower(model)
    if tower is not None:
        units.append(tower)
    return units


def shard_model(model: nn.Module, *, param_dtype: torch.dtype | None = None,
                reduce_dtype: torch.dtype | None = torch.float32, cpu_offload: bool = False,
                reshard_after_forward: bool = True,
                gradient_reduction: Literal["sum", "mean"] = "sum") -> nn.Module:
    """Shard `model` in place with FSDP2 over all ranks of the default process group; returns it.

    param_dtype: compute dtype for forward/backward (e.g. torch.bfloat16); None keeps the parameters' dtype.
    The sharded master parameters, gradients and optimizer state stay in the parameters' own dtype (fp32).
    reduce_dtype: dtype of the gradient reduce-scatter (fp32 keeps bf16 training's gradient sums exact-ish).
    reshard_after_forward: for the layer / block / tower units; the root always keeps its parameters gathered
    until its backward.
    cpu_offload: keep sharded parameters, gradients and optimizer state in CPU memory.
    gradient_reduction: "sum" for the token-mean contract in the module docstring, "mean" for FSDP's average.
    Call `utils.distributed.init_distributed()` first (it also works for a plain one-process run).
    """
    if not dist.is_initialized():
        raise RuntimeError("shard_model needs a process group: call srpo_fast.utils.distributed.init_distributed()")
    if gradient_reduction not in ("sum", "mean"):
        raise ValueError(f"gradient_reduction must be 'sum' or 'mean', got {gradient_reduction!r}")
    for name, dtype in (("param_dtype", param_dtype), ("reduce_dtype", reduce_dtype)):
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"{name} must be a floating torch.dtype or None, got {dtype!r}")
    if isinstance(model, FSDPModule):
        raise ValueError("model is already sharded (it is an FSDPModule)")
    options = dict(
        mp_policy=MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype),
        reshard_after_forward=reshard_after_forward,
        offload_policy=CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cpu_offload else OffloadPolicy(),
    )
    for unit in _sharding_units(model):
        fully_shard(unit, **options)
    # the root (embeddings, final norm, LM head) stays gathered from forward to backward: resharding it after the
    # forward would only all-gather it again at once for the backward (FSDP2's own default for roots, which an
    # explicit reshard_after_forward=True turns off)
    fully_shard(model, **{**options, "reshard_after_forward": False})
    if gradient_reduction == "sum":
        set_sum_gradient_reduction(model)
    return model


def set_sum_gradient_reduction(model: nn.Module) -> None:
    """Make every FSDP unit SUM gradients over ranks instead of averaging them.

    Both calls are needed on every unit: a divide factor of 1 alone makes FSDP use PREMUL_SUM, which gloo lacks;
    forcing plain SUM works on gloo and NCCL alike.
    """
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not units:
        raise ValueError("model has no FSDP units; call shard_model first")
    for unit in units:
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)


def clip_grad_norm(parameters: nn.Module | Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip gradients to a global L2 norm of max_norm; returns the norm before clipping as a plain 0-d tensor.

    Works for sharded (DTensor) and plain gradients: the norm is over the full, unsharded gradients, equal on every
    rank. A non-finite norm is returned as is (gradients then get scaled by nan/inf); the caller decides whether to
    skip the step.
    """
    if max_norm <= 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm}")
    params = list(parameters.parameters() if isinstance(parameters, nn.Module) else parameters)
    grads_owners = [p for p in params if p.grad is not None]
    if not grads_owners:
        return torch.zeros(())
    total = torch.nn.utils.clip_grad_norm_(grads_owners, max_norm=max_norm, foreach=True)
    return total.full_tensor() if isinstance(total, DTensor) else total


def build_optimizer(model: nn.Module, lr: float, *, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                    weight_decay: float = 0.0, fused: bool | None = None,
                    impl: Literal["torch", "deepspeed_cpu_adam"] = "torch") -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; weight decay only on matrices (not on biases and norm weights).
    The trainer passes train.lr, train.adam_betas, train.adam_eps and train.weight_decay.

    fused=None uses the fused CUDA kernel when every trainable parameter lives on CUDA, else torch's foreach path.
    Build it after `shard_model`, so it holds the sharded parameters.
    impl="deepspeed_cpu_adam": the same AdamW through DeepSpeed's CPU Adam op (models/cpu_adam.py), for shards kept
    on CPU by `shard_model(..., cpu_offload=True)`.
    """
    if impl not in ("torch", "deepspeed_cpu_adam"):
        raise ValueError(f"impl must be 'torch' or 'deepspeed_cpu_adam', got {impl!r}")
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas}")
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("model has no trainable parameters")
    if fused is None:
        fused = all(p.device.type == "cuda" for p in trainable)
    decay = [p for p in trainable if p.dim() >= 2]
    no_decay = [p for p in trainable if p.dim() < 2]
    groups = [{"params": group, "weight_decay": wd} for group, wd in ((decay, weight_decay), (no_decay, 0.0)) if group]
    if impl == "deepspeed_cpu_adam":
        from .cpu_adam import DeepSpeedCPUAdamW

        return DeepSpeedCPUAdamW(groups, lr=lr, betas=tuple(betas), eps=eps)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=fused)


def build_lr_scheduler(optimizer: torch.optim.Optimizer, *, total_steps: int, warmup_ratio: float = 0.0,
                       schedule: Literal["constant", "cosine"] = "constant",
                       min_lr_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ceil(warmup_ratio * total_steps) steps, then constant or cosine decay to
    min_lr_ratio * lr at total_steps. Call `scheduler.step()` once per optimizer step."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0.0 <= warmup_ratio < 1.0:
        raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio}")
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"schedule must be 'constant' or 'cosine', got {schedule!r}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    warmup_steps = math.ceil(warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
