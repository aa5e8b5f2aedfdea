"""The packed-row layout: samples (prompt + response, optional images) concatenated into padding-free rows.

A micro-batch is ONE row of concatenated sequences: no pad tokens, attention kept inside each sequence by
`cu_seqlens` (the varlen attention in models/attention.py). Per row:
  input_ids      [1, L] int64
  position_ids   [1, L] text positions restarting at 0 per sequence, or for Qwen2(.5)-VL [4, 1, L]: row 0 the
                 text positions (transformers separates sequences by them), rows 1-3 the M-RoPE ids that
                 `model.model.get_rope_index` gives each sequence alone (`MRopeIndexer`, cached per prompt)
  cu_seqlens     [S+1] int32 sequence boundaries in the row; max_seqlen the longest sequence
  response layout: the R response tokens of all sequences, in row order — target_positions [R] (row index of
                 each response token; its log-prob comes from the hidden state one position earlier),
                 response_cu_seqlens [S+1] int32, loss_mask [R] float32. This is the flat [T] layout that
                 `kernels.grpo_loss` takes (with cu_seqlens=response_cu_seqlens).
  pixel_values / image_grid_thw / mm_token_type_ids: the samples' image tensors concatenated in row order.

Which samples share a row, and on which rank, is planned in train/batches.py.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace

import torch

RopeIndex = Callable[["Sample"], torch.Tensor]


def _ids(name: str, value) -> torch.Tensor:
    t = value if isinstance(value, torch.Tensor) else torch.as_tensor(list(value), dtype=torch.int64)
    if t.dtype not in (torch.int32, torch.int64) or t.dim() != 1:
        raise TypeError(f"{name} must be a 1-D sequence of ints, got {t.dtype} tensor of shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{name} is empty; every sample needs at least one prompt and one response token")
    return t.detach().to("cpu", torch.int64)


def _per_token(name: str, value, dtype: torch.dtype, expected: int, part: str) -> torch.Tensor:
    t = torch.as_tensor(value).to("cpu", dtype).reshape(-1)
    if t.numel() != expected:
        raise ValueError(f"{name} has {t.numel()} entries for {expected} {part} tokens")
    return t


@dataclass
class Sample:
    """One sequence to train on: prompt ids (image placeholders expanded), response ids, and for a prompt with
    images the processor's tensors for it. response_mask (float or bool, [len(response_ids)]) weights each response
    token in the loss; None means all ones. mm_token_type_ids covers the prompt (1 at image tokens)."""

    prompt_ids: torch.Tensor
    response_ids: torch.Tensor
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    mm_token_type_ids: torch.Tensor | None = None
    response_mask: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.prompt_ids = _ids("prompt_ids", self.prompt_ids)
        self.response_ids = _ids("response_ids", self.response_ids)
        if (self.pixel_values is None) != (self.image_grid_thw is None):
            raise ValueError("pixel_values and image_grid_thw must be given together")
        if self.image_grid_thw is not None:
            grid = torch.as_tensor(self.image_grid_thw).to("cpu", torch.int64)
            if grid.dim() != 2 or grid.shape[1] != 3 or grid.shape[0] == 0:
                raise ValueError(f"image_grid_thw must be [num_images, 3], got shape {tuple(grid.shape)}")
            self.image_grid_thw = grid
            if self.pixel_values.dim() != 2 or self.pixel_values.shape[0] != int(grid.prod(-1).sum()):
                raise ValueError(f"pixel_values must be [{int(grid.prod(-1).sum())} patches, D] for grids "
                                 f"{grid.tolist()}, got shape {tuple(self.pixel_values.shape)}")
            if self.mm_token_type_ids is None:
                raise ValueError("a sample with images needs mm_token_type_ids (the processor's, over the prompt)")
        if self.mm_token_type_ids is not None:
            self.mm_token_type_ids = _per_token("mm_token_type_ids", self.mm_token_type_ids, torch.int64,
                                                self.prompt_ids.numel(), "prompt")
        if self.response_mask is not None:
            self.response_mask = _per_token("response_mask", self.response_mask, torch.float32,
                                            self.response_ids.numel(), "response")

    @property
    def num_tokens(self) -> int:
        return self.prompt_ids.numel() + self.response_ids.numel()

    @property
    def has_images(self) -> bool:
        return self.pixel_values is not None


class MRopeIndexer:
    """M-RoPE position ids (rows 1-3 of a packed Qwen2(.5)-VL row) for one sample, from the model's own
    `get_rope_index` on the sample's prompt alone.

    The n responses of a GRPO group share their prompt, so the prompt's ids are cached (LRU, keyed by the prompt's
    ids, token types and image grids); a response continues the text positions after the prompt's largest id, as
    `get_rope_index` does for text after the last image. Runs on CPU, once per distinct prompt.
    """

    def __init__(self, model: torch.nn.Module, cache_size: int = 4096):
        inner = getattr(model, getattr(model, "base_model_prefix", "model"), model)
        if not hasattr(inner, "get_rope_index"):
            raise TypeError(f"{type(model).__name__} has no get_rope_index; M-RoPE ids are for Qwen2(.5)-VL models")
        self._get_rope_index = inner.get_rope_index
        self.spatial_merge_size = int(inner.config.vision_config.spatial_merge_size)
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple[bytes, ...], torch.Tensor] = OrderedDict()

    def prompt_positions(self, sample: Sample) -> torch.Tensor:
        """[3, prompt_len] int64 M-RoPE ids of the prompt."""
        n = sample.prompt_ids.numel()
        if not sample.has_images:
            return torch.arange(n).expand(3, n)
        merge2 = self.spatial_merge_size ** 2
        expected = int((sample.image_grid_thw.prod(-1) // merge2).sum())
        found = int((sample.mm_token_type_ids == 1).sum())
        if found != expected:
            raise ValueError(f"the prompt has {found} image tokens but its image grids need {expected}")
        key = tuple(t.numpy().tobytes() for t in (sample.prompt_ids, sample.mm_token_type_ids, sample.image_grid_thw))
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            return cached
        pos, _ = self._get_rope_index(input_ids=sample.prompt_ids[None],
                                      mm_token_type_ids=sample.mm_token_type_ids[None],
                                      image_grid_thw=sample.image_grid_thw)
        pos = pos[:, 0].to(torch.int64)
        self._cache[key] = pos
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return pos

    def __call__(self, sample: Sample) -> torch.Tensor:
        """[3, num_tokens] int64 M-RoPE ids of prompt + response."""
        prompt = self.prompt_positions(sample)
        start = int(prompt.max()) + 1
        response = torch.arange(start, start + sample.response_ids.numel()).expand(3, -1)
        return torch.cat([prompt, response], dim=1)


@dataclass
class PackedBatch:
    """One packed row (see the module docstring). sample_indices: which input samples, in row order.

    is_dummy marks a filler micro-batch (train/batches.py): it holds one 2-token sequence with loss_mask 0 and
    exists only so every rank runs the same number of forward/backward passes.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    target_positions: torch.Tensor
    response_cu_seqlens: torch.Tensor
    loss_mask: torch.Tensor
    sample_indices: list[int]
    prompt_lens: list[int]
    response_lens: list[int]
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    mm_token_type_ids: torch.Tensor | None = None
    is_dummy: bool = False

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[-1]

    @property
    def num_sequences(self) -> int:
        return len(self.prompt_lens)

    @property
    def num_response_tokens(self) -> int:
        return self.target_positions.numel()

    @property
    def targets(self) -> torch.Tensor:
        """[R] the response token ids (what the log-probs score)."""
        return self.input_ids[0, self.target_positions]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PackedBatch:
        """A copy with every tensor on `device` (cu_seqlens too: varlen kernels read it on the device)."""
        moved = {f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
                 for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)}
        return replace(self, **moved)

    def gather_response(self, values: Sequence[torch.Tensor | Sequence[float]]) -> torch.Tensor:
        """Per-token values of ALL samples (indexed like the planner's input; values[i] has sample i's response
        length) → [R] in this row's order, e.g. old or reference log-probs. Zeros for a dummy batch."""
        if self.is_dummy:
            return torch.zeros(self.num_response_tokens)
        parts = []
        for i, n in zip(self.sample_indices, self.response_lens):
            v = torch.as_tensor(values[i]).reshape(-1)
            if v.numel() != n:
                raise ValueError(f"values[{i}] has {v.numel()} entries for a response of {n} tokens")
            parts.append(v)
        return torch.cat(parts)

    def gather_sequences(self, values: torch.Tensor | Sequence[float]) -> torch.Tensor:
        """Per-sample values of ALL samples (e.g. advantages) → [S] in this row's order. Zeros for a dummy."""
        if self.is_dummy:
            return torch.zeros(self.num_sequences)
        return torch.as_tensor(values)[torch.as_tensor(self.sample_indices, dtype=torch.long)]


def _cu(lengths: Sequence[int]) -> torch.Tensor:
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.as_tensor(lengths, dtype=torch.int64), 0)
    return cu


def pack_samples(samples: Sequence[Sample], *, rope_index: RopeIndex | None = None,
                 sample_indices: Sequence[int] | None = None) -> PackedBatch:
    """Concatenate `samples` into one row (no budget check: train/batches.py plans rows under the budget).

    rope_index: an `MRopeIndexer` for Qwen2(.5)-VL models (gives [4, 1, L] position ids); None for text models.
    sample_indices: the samples' indices in the caller's list (default 0..n-1), kept for `gather_*`.
    """
    if not samples:
        raise ValueError("pack_samples needs at least one sample")
    for i, s in enumerate(samples):
        if not isinstance(s, Sample):
            raise TypeError(f"samples[{i}] must be a Sample, got {type(s).__name__}")
    if rope_index is None and any(s.has_images for s in samples):
        raise ValueError("samples with images need rope_index=MRopeIndexer(model) for their M-RoPE position ids")
    indices = list(range(len(samples))) if sample_indices is None else [int(i) for i in sample_indices]
    if len(indices) != len(samples):
        raise ValueError(f"{len(indices)} sample_indices for {len(samples)} samples")
    prompt_lens = [s.prompt_ids.numel() for s in samples]
    response_lens = [s.response_ids.numel() for s in samples]
    seq_lens = [p + r for p, r in zip(prompt_lens, response_lens)]
    cu = _cu(seq_lens)
    input_ids = torch.cat([t for s in samples for t in (s.prompt_ids, s.response_ids)])[None]
    text_pos = torch.cat([torch.arange(n) for n in seq_lens])
    if rope_index is not None:
        mrope = torch.cat([rope_index(s) for s in samples], dim=1)
        position_ids = torch.cat([text_pos[None], mrope], dim=0)[:, None, :]
    else:
        position_ids = text_pos[None]
    target_positions = torch.cat([torch.arange(int(start) + p, int(start) + p + r)
                                  for start, p, r in zip(cu[:-1].tolist(), prompt_lens, response_lens)])
    loss_mask = torch.cat([s.response_mask if s.response_mask is not None else torch.ones(r)
                           for s, r in zip(samples, response_lens)])
    batch = PackedBatch(input_ids=input_ids, position_ids=position_ids, cu_seqlens=cu, max_seqlen=max(seq_lens),
                        target_positions=target_positions, response_cu_seqlens=_cu(response_lens),
                        loss_mask=loss_mask, sample_indices=indices, prompt_lens=prompt_lens,
                        response_lens=response_lens)
    with_images = [s for s in samples if s.has_images]
    if with_images:
        batch.pixel_values = torch.cat([s.pixel_values for s in with_images])
        batch.image_grid_thw = torch.cat([s.image_grid_thw for s in with_images])
        batch.mm_token_type_ids = torch.cat([
            t for s in samples for t in (
                s.mm_token_type_ids if s.mm_token_type_ids is not None else torch.zeros(s.prompt_ids.numel(),
                                                                                        dtype=torch.int64),
                torch.zeros(s.response_ids.numel(), dtype=torch.int64))])[None]
    return batch


def dummy_batch(*, vision_language: bool, token_id: int = 0) -> PackedBatch:
    """A filler micro-batch: one sequence of two `token_id` tokens, loss_mask 0, is_dummy=True."""
    sample = Sample(prompt_ids=[token_id], response_ids=[token_id], response_mask=[0.0])
    rope = (lambda s: torch.arange(s.num_tokens).expand(3, -1)) if vision_language else None
    batch = pack_samples([sample], rope_index=rope, sample_indices=[-1])
    batch.is_dummy = True
    return batch
