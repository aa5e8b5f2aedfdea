"""DeepSpeed's CPU Adam op (SIMD, OpenMP threads) as the optimizer of FSDP2's CPU-offloaded shards.

DeepSpeed is used for this one op only; FSDP2 stays the sharding engine. The op updates plain CPU tensors in place,
so each step hands it the local shard of every parameter, gradient and moment (DTensor.to_local() shares storage),
while the optimizer state itself stays DTensors sharded like the parameters: DCP checkpoints save, load and
reshard it exactly like torch's AdamW state. The update is torch.optim.AdamW's (decoupled weight decay, bias
correction from the step count, as torch computes it) in fp32 SIMD lanes; benchmarks/cpu_adam.py measures both
and their agreement. One difference stays: the op forms 1 - beta2 from the fp32 beta2 (0.999 → 0.00099998713), so
its second moment sits 1.3e-5 (relative) below torch's; the bias correction here uses the same fp32 betas, so the
step itself agrees to fp32 rounding.

The op is compiled by DeepSpeed's JIT builder (g++ and ninja) on first use and cached under
TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions); that first build takes minutes on a small machine.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Iterable
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from srpo_fast.config import ConfigError

_OPTIMIZER_IDS = itertools.count(10_000)  # DeepSpeed's own optimizers count from 0 in the same op registry


class CPUAdamUnavailable(ConfigError):
    """DeepSpeed's CPU Adam cannot be used here (a config error for the trainer: train.offload_optimizer names
    it); the message says why and what to do."""


def load_cpu_adam_op():
    """DeepSpeed's compiled cpu_adam extension (built on first use), or CPUAdamUnavailable naming the reason."""
    try:
        from deepspeed.ops.op_builder import CPUAdamBuilder
    except ImportError as exc:
        raise CPUAdamUnavailable(f"train.offload_optimizer=deepspeed_cpu_adam needs deepspeed: pip install "
                                 f"'srpo_fast[offload]' (import failed: {exc})") from exc
    builder = CPUAdamBuilder()
    if not builder.is_compatible(verbose=False):
        raise CPUAdamUnavailable("DeepSpeed reports its cpu_adam op as incompatible with this machine "
                                 "(python -m deepspeed.env_report says why); use train.offload_optimizer=torch")
    try:
        return builder.load(verbose=False)
    except Exception as exc:  # noqa: BLE001 - a compiler or loader failure of any kind
        raise CPUAdamUnavailable(f"DeepSpeed's cpu_adam op failed to build or load ({type(exc).__name__}: {exc}); "
                                 "it needs g++ and ninja; use train.offload_optimizer=torch") from exc


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


class DeepSpeedCPUAdamW(torch.optim.Optimizer):
    """AdamW on CPU through DeepSpeed's cpu_adam op; parameters may be FSDP2 DTensors (their local shards are
    updated). fp32 parameters, gradients and moments, all on CPU."""

    def __init__(self, params: Iterable[Any], lr: float, *, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        for group in self.param_groups:
            for p in group["params"]:
                if p.device.type != "cpu" or p.dtype != torch.float32:
                    raise ValueError(f"DeepSpeed's CPU Adam updates fp32 CPU tensors, got a {p.dtype} parameter on "
                                     f"{p.device}: shard with cpu_offload=True (train.cpu_offload=true)")
        self._op = load_cpu_adam_op()
        self._id = next(_OPTIMIZER_IDS)
        self._op.create_adam(self._id, lr, betas[0], betas[1], eps, weight_decay, True, False)  # adamw_mode

    def __del__(self):
        op = getattr(self, "_op", None)
        if op is not None:
            op.destroy_adam(self._id)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:  # laid out like torch's AdamW state, so checkpoints look the same
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                tensors = [_local(t) for t in (p, p.grad, state["exp_avg"], state["exp_avg_sq"])]
                for t in tensors:
                    if not t.is_contiguous() or t.dtype != torch.float32 or t.device.type != "cpu":
                        # the op would update a contiguous copy and silently drop the result
                        raise ValueError(f"DeepSpeed's CPU Adam needs contiguous fp32 CPU tensors, got "
                                         f"{t.dtype} on {t.device} (contiguous={t.is_contiguous()})")
                lr, eps, weight_decay = _bias_corrected(int(state["step"].item()), float(group["lr"]), beta1, beta2,
                                                        group["eps"], group["weight_decay"])
                self._op.adam_update(self._id, int(state["step"].item()), lr, beta1, beta2, eps, weight_decay, False,
                                     *tensors)
        return loss


def _bias_corrected(step: int, lr: float, beta1: float, beta2: float, eps: float,
                    weight_decay: float) -> tuple[float, float, float]:
    """(lr, eps, weight_decay) that make the op's uncorrected update equal AdamW's bias-corrected one:
    lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps) = [lr*sqrt(bc2)/bc1] * m / (sqrt(v) + [eps*sqrt(bc2)]), and decay
    lr*wd kept. The corrections come from the step count in float64, using the betas as the op rounds them to
    fp32, so they match its moments exactly. Left to itself the op would keep beta^t as a running fp32 product:
    after a resume (a fresh op, beta^t from pow) the steps would differ in the last bits from an uninterrupted run."""
    b1, b2 = (float(torch.tensor(b, dtype=torch.float32)) for b in (beta1, beta2))
    bc1, bc2 = 1.0 - b1 ** step, 1.0 - b2 ** step
    effective_lr = lr * math.sqrt(bc2) / bc1
    return effective_lr, eps * math.sqrt(bc2), weight_decay * lr / effective_lr if effective_lr > 0 else 0.0
