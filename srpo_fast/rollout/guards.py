"""Guard rails on sampled responses: which ids to block at sampling, which to flag afterwards, per-request seeds.

A response holding a vision special token (`<|image_pad|>`, `<|vision_start|>`, ...) cannot be re-scored by the
trainer: the model's forward counts `<|image_pad|>` tokens against the image features and fails (or, for
`<|vision_start|>`, shifts the M-RoPE positions). Engines block these ids at sampling and still flag any that get
through. Ids beyond the tokenizer (Qwen pads the embedding past it) score fine but decode to '' — flagged so the
reward side can tell an empty-looking answer from a real one.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")


def vision_token_ids(tokenizer) -> list[int]:
    """Ids of the vision special tokens this tokenizer has (a Qwen text tokenizer has them too)."""
    vocab = tokenizer.get_vocab()
    return sorted(vocab[token] for token in VISION_TOKENS if token in vocab)


def tokenizer_size(tokenizer) -> int:
    """Number of ids the tokenizer can decode (added tokens included): ids at or past it are out of vocab."""
    return len(tokenizer)


def flag_response(response_ids: Sequence[int], vision_ids: Iterable[int], vocab_size: int) -> tuple[bool, bool]:
    """(has_vision_tokens, has_out_of_vocab) for one response."""
    vision = set(vision_ids)
    return any(t in vision for t in response_ids), any(t >= vocab_size or t < 0 for t in response_ids)


def request_seed(seed: int, index: int) -> int:
    """A seed for request `index` of a call seeded with `seed`; distinct requests get independent streams (a hash,
    not seed + index, so consecutive calls seeded seed and seed + 1 do not replay each other's streams)."""
    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, index]).generate_state(1, dtype=np.uint32)[0] >> 1)
