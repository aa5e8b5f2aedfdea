"""Forward passes over one packed row: final hidden states, and per-token log-probs of the response tokens.

The log-probs never go through [T, V] logits: the backbone's hidden states at the positions that predict response
tokens (token t is scored from the hidden state at t-1) go straight into `kernels.linear_token_logprobs` with the
LM head's weight.

Why the whole model is called and not just its backbone: under FSDP2 the root unit (embeddings, final norm,
lm_head) is gathered by the root module's forward hooks and resharded when its forward returns, so the call has to
enter through the root, and the LM head weight is only whole inside it. A forward hook on the backbone therefore
does the log-prob computation while the root's parameters are gathered; the model's own LM head then runs on zero
positions (logits_to_keep is an empty index), so no logits are computed.

Data-parallel VL training: FSDP gathers the vision tower's parameters only when the tower runs, so a rank whose
micro-batch has no image (or a dummy micro-batch) would skip collectives the other ranks make, and hang them.
`sync_vision` runs the tower on a one-token dummy image at the point where images would be encoded and adds
0 x its output to the embeddings — numerically nothing, but the same collectives (and zero gradients) everywhere.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from srpo_fast.data.packing import PackedBatch
from srpo_fast.kernels import linear_token_logprobs

from .loading import backbone, is_vision_language, output_head


def packed_model_inputs(batch: PackedBatch) -> dict:
    """Keyword arguments for `model(...)` on a packed row: no attention mask, no cache, explicit sequence bounds."""
    if batch.input_ids.dim() != 2 or batch.input_ids.shape[0] != 1:
        raise ValueError(f"a packed batch is one row: input_ids must be [1, L], got {tuple(batch.input_ids.shape)}")
    cu = batch.cu_seqlens
    inputs = dict(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False,
                  cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=batch.max_seqlen, max_length_k=batch.max_seqlen)
    if batch.pixel_values is not None:
        inputs.update(pixel_values=batch.pixel_values, image_grid_thw=batch.image_grid_thw,
                      mm_token_type_ids=batch.mm_token_type_ids)
    return inputs


def _check_model_fits(model: nn.Module, batch: PackedBatch) -> None:
    vl = is_vision_language(model)
    if vl and batch.position_ids.dim() != 3:
        raise ValueError("a Qwen2(.5)-VL model needs [4, 1, L] position ids: pack with rope_index=MRopeIndexer(model)")
    if not vl and batch.position_ids.dim() != 2:
        raise ValueError(f"a text model needs [1, L] position ids, got shape {tuple(batch.position_ids.shape)}")
    if not vl and batch.pixel_values is not None:
        raise ValueError("the batch has images but the model is text-only")


def _dummy_image_zero(tower: nn.Module, device: torch.device) -> torch.Tensor:
    """0 * sum(tower(one-token dummy image)): a zero that depends on every vision parameter.

    device: where the forward computes (the embeddings' device). Not the parameter's: under FSDP2 CPU offload the
    sharded parameter lives on the CPU while the tower runs on the GPU."""
    proj = tower.patch_embed.proj
    merge = int(tower.spatial_merge_size)
    grid = torch.tensor([[1, merge, merge]], device=device)
    pixels = torch.zeros(merge * merge, proj.in_channels * math.prod(proj.kernel_size), device=device,
                         dtype=proj.weight.dtype)
    out = tower(pixels, grid_thw=grid)
    out = getattr(out, "pooler_output", out)
    if isinstance(out, (list, tuple)):
        out = torch.cat(list(out))
    return out.sum() * 0.0


def _default_sync_vision() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _run_packed(model: nn.Module, batch: PackedBatch, sync_vision: bool | None,
                on_hidden: Callable[[torch.Tensor], Any]) -> Any:
    """Forward `batch` through the whole model and return `on_hidden(hidden [L, H])`, computed inside the root's
    forward (FSDP root parameters gathered) and attached to its output, so that FSDP's pre-backward hooks see it
    and regather the root before autograd reaches it."""
    _check_model_fits(model, batch)
    inner = backbone(model)
    hidden: list[torch.Tensor] = []
    results: list[Any] = []

    def finish(module, args, output):
        result = on_hidden(hidden[0])
        results.append(result)
        # FSDP hooks the grad-requiring tensors it finds in a module's output, through dataclass fields or dict
        # values/pytree leaves depending on the torch version; hidden_states is both, and unused here
        output["hidden_states"] = result if isinstance(result, tuple) else (result,)
        return output

    handles = [inner.register_forward_hook(lambda module, args, output: hidden.append(output[0][0])),
               model.register_forward_hook(finish, prepend=True)]  # before FSDP's post-forward hook
    if sync_vision is None:
        sync_vision = _default_sync_vision()
    if sync_vision and is_vision_language(model) and batch.pixel_values is None:
        tower = inner.visual

        def add_zero(module, args, kwargs):
            embeds = kwargs["inputs_embeds"]
            kwargs["inputs_embeds"] = embeds + _dummy_image_zero(tower, embeds.device).to(embeds.dtype)
            return args, kwargs

        handles.append(inner.language_model.register_forward_pre_hook(add_zero, with_kwargs=True))
    try:
        nothing = torch.empty(0, dtype=torch.long, device=batch.input_ids.device)
        model(**packed_model_inputs(batch), logits_to_keep=nothing, return_dict=True)
    finally:
        for handle in handles:
            handle.remove()
    if len(hidden) != 1 or len(results) != 1:
        raise RuntimeError(f"expected one backbone call per forward, saw {len(hidden)}")
    return results[0]


def packed_hidden_states(model: nn.Module, batch: PackedBatch, *, sync_vision: bool | None = None) -> torch.Tensor:
    """Final (normed) hidden states [L, H] of one packed row, in the model's compute dtype.

    sync_vision: for VL models, run the vision tower on a dummy image when the batch has none (see the module
    docstring). None: on when torch.distributed runs with more than one rank.
    """
    return _run_packed(model, batch, sync_vision, lambda hidden: hidden)


def packed_token_logprobs(model: nn.Module, batch: PackedBatch, *, temperature: float = 1.0,
                          return_entropy: bool = False, sync_vision: bool | None = None, check: bool = False
                          ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log pi(response token | everything before it in its sequence) / temperature-scaled, fp32 [R] in the batch's
    response order (`batch.target_positions`); with return_entropy=True also the entropy [R] of each of those
    distributions. Differentiable w.r.t. the model's parameters.

    check: verify that every target id is below the LM head's rows (one device sync per call). Off by default: the
    targets are token ids the engine sampled from this model's own vocabulary, and the step loop has no host sync."""
    positions, targets = batch.target_positions - 1, batch.targets

    def logprobs(hidden: torch.Tensor):
        weight, bias = output_head(model)
        return linear_token_logprobs(hidden.index_select(0, positions), weight, targets, temperature=temperature,
                                     return_entropy=return_entropy, bias=bias, check=check)

    return _run_packed(model, batch, sync_vision, logprobs)
