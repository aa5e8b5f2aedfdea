"""Variable-length ("packed") causal attention, plugged into transformers through its AttentionInterface.

Why our own: transformers' sdpa/eager paths detect a packed row from its position ids and then build an
O(L^2) mask for it, and flash_attention_2 needs flash-attn installed. Registered under the name
``srpo_varlen``, this function attends within each sequence of a packed row only, given the row's
``cu_seq_lens_q/k`` (int32 [S+1]) and ``max_length_q/k`` (int) as keyword arguments of ``model(...)``:

  * CUDA, fp16/bf16: ``flash_attn_varlen_func`` when flash-attn is importable, else torch's native
    ``torch.nn.attention.varlen.varlen_attn`` (torch >= 2.9), else per-segment SDPA;
  * CPU, fp32 or no varlen kernel: SDPA per segment (GQA through ``enable_gqa``), O(sum of L_i^2) work.
  ``SRPO_FAST_ATTN=flash_attn|torch_varlen|sdpa_segments`` forces one backend (for benchmarks and tests).

Everything that is not a packed training row falls back to transformers' own SDPA function: a 2-D padding mask
(left-padded generation), a KV cache (query shorter than keys), or a custom 4-D mask. A mask function is registered
under the same name so that padded batches still get their mask, while packed rows and unpadded batches get none.
Without cu_seq_lens, sequence starts are read from ``position_ids`` (a position that does not continue the previous
one by +1 starts a new sequence; one device sync per layer, so pass cu_seq_lens in training).

Qwen2(.5)-VL: the language model gets it through ``attn_implementation_for``. The vision tower is loaded with SDPA
(transformers then splits every layer's input per image/window on the host: one device sync and one kernel per
window); on CUDA with a varlen kernel, ``use_varlen_vision_attention`` switches it to this function under a name
containing "flash", the only way transformers hands the tower's attention its ``cu_seqlens`` (one call per layer).
The switch happens after loading because from_pretrained would look such a name up as a hub kernel.
"""
from __future__ import annotations

import functools
import importlib.util
import inspect
import os

import torch
import torch.nn.functional as F

ATTN_NAME = "srpo_varlen"
VISION_ATTN_NAME = "srpo_flash_varlen"  # "flash" in the name: transformers' vision attention then passes cu_seqlens
BACKEND_ENV = "SRPO_FAST_ATTN"
BACKENDS = ("flash_attn", "torch_varlen", "sdpa_segments")
_HALF = (torch.float16, torch.bfloat16)


@functools.cache
def has_flash_attn() -> bool:
    """flash-attn 2's varlen kernel is importable. Not merely a `flash_attn` module: the `flash-attn-4` package
    installs only the namespace package `flash_attn.cute` (another API), which find_spec("flash_attn") also finds."""
    if importlib.util.find_spec("flash_attn") is None:
        return False
    try:
        from flash_attn import flash_attn_varlen_func
    except (ImportError, OSError):  # FA4 alone, or an extension built for another torch/CUDA
        return False
    return callable(flash_attn_varlen_func)


@functools.cache
def _torch_varlen():
    """(varlen_attn, its keyword names) or None. Causality is is_causal in torch 2.9/2.10, window_size from 2.11;
    enable_gqa and scale exist only in newer versions."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def varlen_backend(device: torch.device, dtype: torch.dtype) -> str:
    """The backend the packed path uses for tensors of this device and dtype (see the module docstring)."""
    forced = os.environ.get(BACKEND_ENV, "").strip().lower()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"{BACKEND_ENV} must be one of {BACKENDS}, got {forced!r}")
        if forced != "sdpa_segments" and (device.type != "cuda" or dtype not in _HALF):
            raise RuntimeError(f"{BACKEND_ENV}={forced} needs fp16/bf16 CUDA tensors, got {dtype} on {device}")
        if forced == "flash_attn" and not has_flash_attn():
            raise RuntimeError(f"{BACKEND_ENV}=flash_attn but flash-attn is not installed")
        if forced == "torch_varlen" and _torch_varlen() is None:
            raise RuntimeError(f"{BACKEND_ENV}=torch_varlen but this torch has no torch.nn.attention.varlen")
        return forced
    if device.type == "cuda" and dtype in _HALF:
        if has_flash_attn():
            return "flash_attn"
        if _torch_varlen() is not None:
            return "torch_varlen"
    return "sdpa_segments"


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """int32 [S+1] sequence boundaries of a [B, L] position-id tensor flattened row-major: a new sequence starts at
    every row start and wherever a position is not the previous one + 1."""
    pos = position_ids.reshape(position_ids.shape[0], -1)
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    idx = torch.nonzero(starts.reshape(-1)).reshape(-1)
    end = torch.tensor([pos.numel()], device=pos.device, dtype=idx.dtype)
    return torch.cat([idx, end]).to(torch.int32)


def _equal_length_runs(lengths: list[int]) -> list[tuple[int, int]]:
    """(length, count) for each run of consecutive equal, non-zero lengths: runs of segments of one length go to
    SDPA as one batch (a GRPO group's truncated responses, a vision tower's windows)."""
    runs: list[tuple[int, int]] = []
    for n in lengths:
        if n == 0:
            continue
        if runs and runs[-1][0] == n:
            runs[-1] = (n, runs[-1][1] + 1)
        else:
            runs.append((n, 1))
    return runs


def _segments_sdpa(q, k, v, cu: torch.Tensor, scale, dropout: float, causal: bool) -> torch.Tensor:
    """q [1, Hq, T, D], k/v [1, Hkv, T, D] (transformers' layout) → [1, T, Hq, D]; attention within each sequence
    of `cu`, with no cross-sequence mask at all: one SDPA call per run of equal-length sequences (a [n, H, L, D]
    batch), O(sum of L_i^2) work.

    Why this shape: torch's CPU SDPA picks its flash kernel only for 4-D inputs (3-D ones run the math kernel,
    3-4x slower forward+backward with O(L^2) memory), and the segments are views made by one split along the
    sequence dimension, whose backward is a single concatenation (slicing each segment out would make autograd
    build a zero-filled full-size gradient per segment: O(segments x T) work per layer)."""
    lengths = (cu[1:] - cu[:-1]).tolist()
    if sum(lengths) != q.shape[2] or min(lengths, default=0) < 0:
        raise ValueError(f"cu_seqlens {cu.tolist()} does not split the row's {q.shape[2]} tokens into sequences")
    runs = _equal_length_runs(lengths)
    gqa = q.shape[1] != k.shape[1]
    sizes = [n * count for n, count in runs]
    pieces = zip(*(t.split(sizes, dim=2) for t in (q, k, v))) if len(runs) > 1 else [(q, k, v)]
    outs = []
    for (n, count), piece in zip(runs, pieces):
        if count > 1:  # [1, H, count*n, D] → [count, H, n, D]: a view in transformers' [B, L, H, D] memory order
            piece = [t.transpose(1, 2).reshape(count, n, t.shape[1], t.shape[3]).transpose(1, 2) for t in piece]
        out = F.scaled_dot_product_attention(*piece, dropout_p=dropout, is_causal=causal, scale=scale,
                                             enable_gqa=gqa)
        outs.append(out.transpose(1, 2).reshape(1, count * n, out.shape[1], out.shape[3]))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


def _flash_attn(q, k, v, cu, max_len: int, scale, dropout: float, causal: bool) -> torch.Tensor:
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, dropout_p=dropout, softmax_scale=scale,
                                  causal=causal)


def _torch_varlen_attn(q, k, v, cu, max_len: int, scale, dropout: float, causal: bool) -> torch.Tensor:
    if dropout:
        raise ValueError("torch's varlen_attn has no dropout; use dropout=0 or another backend")
    varlen_attn, params = _torch_varlen()
    extra = {"window_size": (-1, 0) if causal else (-1, -1)} if "window_size" in params else {"is_causal": causal}
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in params:
            extra["enable_gqa"] = True
        else:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    if "scale" in params:
        extra["scale"] = scale
    elif scale is not None and abs(scale - q.shape[-1] ** -0.5) > 1e-12:
        raise ValueError("this torch's varlen_attn takes no scale, and the model's is not 1/sqrt(head_dim)")
    return varlen_attn(q, k, v, cu, cu, max_len, max_len, **extra)


_VARLEN_IMPLS = {"flash_attn": _flash_attn, "torch_varlen": _torch_varlen_attn}


def varlen_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, scaling: float | None = None,
                             dropout: float = 0.0, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention function: q [B, Hq, L, D], k/v [B, Hkv, L, D] → ([B, L, Hq, D], None)."""
    if kwargs.get("sliding_window") is not None:
        raise ValueError(f"{ATTN_NAME} attention has no sliding-window support (got sliding_window="
                         f"{kwargs['sliding_window']}); use attn_implementation='sdpa' for this model")
    batch, _, q_len, _ = query.shape
    if attention_mask is not None or key.shape[2] != q_len:
        return _padded_sdpa(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else bool(causal)
    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None:
        if batch != 1:
            raise ValueError(f"cu_seq_lens_q describes one packed row, but the batch has {batch} rows")
        if kwargs.get("cu_seq_lens_k") is not None and kwargs["cu_seq_lens_k"] is not cu and not torch.equal(
                kwargs["cu_seq_lens_k"], cu):
            raise ValueError("cu_seq_lens_k must equal cu_seq_lens_q for self-attention over a packed row")
        max_len = kwargs.get("max_length_q")
    elif kwargs.get("position_ids") is not None and kwargs["position_ids"].shape[-1] == q_len:
        cu = cu_seqlens_from_position_ids(kwargs["position_ids"].expand(batch, q_len))
        max_len = None
    else:  # every row is one sequence
        cu = torch.arange(0, (batch + 1) * q_len, q_len, device=query.device, dtype=torch.int32)
        max_len = q_len
    cu = cu.to(device=query.device, dtype=torch.int32)
    if not dropout or not module.training:
        dropout = 0.0
    backend = varlen_backend(query.device, query.dtype)
    if backend == "sdpa_segments":
        # [B, H, L, D] → one row [1, H, B*L, D]: a view for B == 1 (the packed case), one copy otherwise
        row = [t if batch == 1 else t.transpose(1, 2).reshape(1, batch * q_len, t.shape[1], t.shape[3]).transpose(
            1, 2) for t in (query, key, value)]
        out = _segments_sdpa(*row, cu, scaling, dropout, causal)[0]
    else:
        # [B, H, L, D] → [B*L, H, D]: a view for B == 1 (the packed case), one copy otherwise
        q, k, v = (t.transpose(1, 2).reshape(batch * q_len, t.shape[1], t.shape[3]) for t in (query, key, value))
        if max_len is None:
            max_len = int((cu[1:] - cu[:-1]).max())
        out = _VARLEN_IMPLS[backend](q, k, v, cu, int(max_len), scaling, dropout, causal)
    return out.reshape(batch, q_len, out.shape[1], out.shape[2]), None


def _padded_sdpa(module, query, key, value, attention_mask, scaling, dropout: float, **kwargs):
    """Padded batches and KV-cache steps. On CPU with a mask and grouped-query heads, SDPA runs the groups itself
    (`enable_gqa`, its flash kernel takes the mask): transformers' SDPA function copies K/V once per group there
    (it keeps masked GQA off because CUDA would fall back to the math kernel), which in left-padded generation is
    a copy of the whole cache per layer and step. Everything else: transformers' own SDPA function."""
    groups = getattr(module, "num_key_value_groups", 1)
    if (query.device.type == "cpu" and attention_mask is not None and groups > 1 and
            kwargs.get("position_bias") is None and kwargs.get("cache") is None):
        dropout = dropout if module.training else 0.0
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                             scale=scaling, enable_gqa=True)
        return out.transpose(1, 2).contiguous(), None
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                  **kwargs)


def _varlen_mask(*args, **kwargs):
    """Mask function for the same name: no mask for packed rows and unpadded batches (the attention function
    separates sequences itself); transformers' SDPA mask when there is padding or a cache offset."""
    from transformers.masking_utils import sdpa_mask

    no_padding = kwargs.get("attention_mask") is None
    no_offset = kwargs.get("q_offset", 0) == 0 and kwargs.get("kv_offset", 0) == 0
    if no_padding and no_offset and kwargs.get("kv_length") == kwargs.get("q_length"):
        return None
    return sdpa_mask(*args, **kwargs)


def register_varlen_attention(name: str = ATTN_NAME) -> str:
    """Register the attention and mask functions with transformers under `name` (idempotent); returns name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, varlen_attention_forward)
    AttentionMaskInterface.register(name, _varlen_mask)
    return name


def has_cuda_varlen_kernel() -> bool:
    """A varlen attention kernel for CUDA tensors is available (flash-attn 2, or torch's own)."""
    return torch.cuda.is_available() and (has_flash_attn() or _torch_varlen() is not None)


def use_varlen_vision_attention(model: torch.nn.Module) -> bool:
    """Run a loaded Qwen2(.5)-VL vision tower's attention through `varlen_attention_forward` with the tower's
    cu_seqlens (see the module docstring); returns whether the model has a vision config to switch. Call it on the
    unsharded model, before the first forward."""
    from transformers import AttentionInterface

    vision_config = getattr(getattr(model, "config", None), "vision_config", None)
    if vision_config is None:
        return False
    AttentionInterface.register(VISION_ATTN_NAME, varlen_attention_forward)
    vision_config._attn_implementation = VISION_ATTN_NAME
    return True


def attn_implementation_for(model_type: str, name: str) -> str | dict[str, str]:
    """The attn_implementation argument for from_pretrained: for VL models our varlen attention goes to the
    language model only and the vision tower keeps SDPA (transformers runs it per image there)."""
    if name == ATTN_NAME:
        register_varlen_attention(name)
    if model_type in ("qwen2_5_vl", "qwen2_vl") and name == ATTN_NAME:
        return {"text_config": name, "vision_config": "sdpa"}
    return name
