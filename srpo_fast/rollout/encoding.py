"""Requests → token ids and image tensors, exactly as the trainer's processor would produce them.

Both engines go through here, so they agree with each other and with the trainer by construction. We tokenize the
chat template with ONE `<|image_pad|>` per image (the form vLLM expands itself from the images it is given), and
expand each placeholder to the processor's count (grid t*h*w / merge²) for the trainer-facing prompt ids. The
rollout tests check the result against the processor's own `input_ids`, `mm_token_type_ids` and `pixel_values`.

Images are resized here, once, to the processor's target size (smart_resize, the processor's resample filter, PIL):
vLLM builds its own processor, whose resize backend (torchvision when installed) rounds differently from the PIL
processor the trainer uses — ~1 uint8 step on resized images, enough to move log-probs by 0.1-0.4 nats on the tiny
model. Given an image already at its target size, both processors leave it as is, and the processor's output for
the resized image equals its output for the original exactly (tests check both).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .types import ImageInputs, InvalidRequestError, OverlongPolicy, RolloutRequest


@dataclass(frozen=True)
class PreparedPrompt:
    index: int
    engine_ids: list[int]  # one placeholder per image: what the engine is given
    prompt_ids: list[int]  # placeholders expanded: what the engine reports and the trainer packs
    images: tuple[Any, ...]
    image_inputs: ImageInputs | None


class PromptBuilder:
    """Turns `RolloutRequest`s into `PreparedPrompt`s with one processor (or a bare tokenizer for text models)."""

    def __init__(self, processor, *, max_images: int):
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.image_processor = getattr(processor, "image_processor", None)
        self.image_token_id = getattr(processor, "image_token_id", None) if self.image_processor else None
        self.max_images = max_images

    def prepare(self, index: int, request: RolloutRequest) -> PreparedPrompt:
        if not isinstance(request, RolloutRequest):
            raise InvalidRequestError(index, f"expected a RolloutRequest, got {type(request).__name__}")
        images = request.images
        if images and self.image_processor is None:
            raise InvalidRequestError(index, f"{len(images)} image(s) given to a text-only model")
        if len(images) > self.max_images:
            raise InvalidRequestError(index, f"{len(images)} images, more than max_images_per_prompt="
                                             f"{self.max_images}")
        try:
            ids = self._tokenize(request)
        except Exception as exc:  # a template or tokenizer failure on this request's content
            raise InvalidRequestError(index, f"cannot tokenize the prompt: {type(exc).__name__}: {exc}") from exc
        ids = self._collapse_placeholders(ids)
        images = tuple(self._presize(index, image) for image in images)
        placeholders = ids.count(self.image_token_id) if self.image_token_id is not None else 0
        if placeholders != len(images):
            raise InvalidRequestError(index, f"{placeholders} image placeholder(s) in the prompt but {len(images)} "
                                             "image(s) given")
        if not images:
            return PreparedPrompt(index, ids, list(ids), images, None)
        try:
            encoded = self.image_processor(images=list(images), return_tensors="pt")
        except Exception as exc:
            raise InvalidRequestError(index, f"image processor failed: {type(exc).__name__}: {exc}") from exc
        grid = encoded["image_grid_thw"].to(torch.int64)
        merge = int(getattr(self.image_processor, "merge_size", 2))
        counts = (grid.prod(dim=-1) // (merge * merge)).tolist()
        expanded = self._expand(ids, counts)
        mm_types = torch.tensor([1 if t == self.image_token_id else 0 for t in expanded], dtype=torch.int64)
        return PreparedPrompt(index, ids, expanded, images,
                              ImageInputs(pixel_values=encoded["pixel_values"], image_grid_thw=grid,
                                          mm_token_type_ids=mm_types))

    def _presize(self, index: int, image):
        from PIL import Image
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

        if not isinstance(image, Image.Image):
            raise InvalidRequestError(index, f"images must be PIL images, got {type(image).__name__}")
        low, high = pixel_bounds(self.image_processor)
        factor = int(self.image_processor.patch_size) * int(self.image_processor.merge_size)
        try:
            height, width = smart_resize(image.height, image.width, factor=factor, min_pixels=low, max_pixels=high)
        except ValueError as exc:  # e.g. an aspect ratio beyond 200
            raise InvalidRequestError(index, f"image of size {image.size}: {exc}") from exc
        image = image.convert("RGB") if image.mode != "RGB" else image
        if (width, height) == image.size:
            return image
        return image.resize((width, height), resample=self.image_processor.resample)

    def _tokenize(self, request: RolloutRequest) -> list[int]:
        if request.prompt_ids is not None:
            ids = [int(t) for t in request.prompt_ids]
            if not ids:
                raise ValueError("prompt_ids is empty")
            return ids
        text = self.tokenizer.apply_chat_template(list(request.messages), tokenize=False, add_generation_prompt=True)
        return list(self.tokenizer(text)["input_ids"])

    def _collapse_placeholders(self, ids: list[int]) -> list[int]:
        """An already-expanded run of `<|image_pad|>` becomes one placeholder (vLLM would expand it again)."""
        if self.image_token_id is None:
            return ids
        out: list[int] = []
        for t in ids:
            if t == self.image_token_id and out and out[-1] == self.image_token_id:
                continue
            out.append(t)
        return out

    def _expand(self, ids: list[int], counts: list[int]) -> list[int]:
        out: list[int] = []
        image = 0
        for t in ids:
            if t == self.image_token_id:
                out.extend([t] * counts[image])
                image += 1
            else:
                out.append(t)
        return out


def pixel_bounds(image_processor) -> tuple[int, int]:
    """(min_pixels, max_pixels) the image processor resizes to (transformers keeps them in size's
    shortest_edge / longest_edge)."""
    size = image_processor.size
    get = size.get if isinstance(size, dict) else lambda key: getattr(size, key, None)
    low, high = get("shortest_edge"), get("longest_edge")
    if low is None or high is None:
        raise ValueError(f"image processor size {size!r} has no shortest_edge/longest_edge pixel bounds")
    return int(low), int(high)


def too_long(reason: str) -> bool:
    """Whether a `Rollouts.skipped` reason is the prompt-length limit (the others: invalid requests)."""
    return reason.startswith("prompt has ")


def prepare_batch(builder: PromptBuilder, requests: Sequence[RolloutRequest], policy: OverlongPolicy, limit: int
                  ) -> tuple[list[PreparedPrompt], dict[int, str]]:
    """Prepare every request. A prompt the engine cannot run — longer than `limit` tokens (placeholders expanded),
    or invalid (bad or too many images, a template failure) — raises InvalidRequestError under policy "error", and
    under "skip" is left out and reported by index with the reason (a trainer must not die on one bad record)."""
    if policy not in ("error", "skip"):
        raise ValueError(f"on_overlong_prompt must be 'error' or 'skip', got {policy!r}")
    prepared, skipped = [], {}
    for index, request in enumerate(requests):
        try:
            p = builder.prepare(index, request)
        except InvalidRequestError as exc:
            if policy == "error":
                raise
            skipped[index] = str(exc).removeprefix(f"request {index}: ")
            continue
        if len(p.prompt_ids) > limit:
            message = f"prompt has {len(p.prompt_ids)} tokens, more than the limit of {limit}"
            if policy == "error":
                raise InvalidRequestError(index, message)
            skipped[index] = message
            continue
        prepared.append(p)
    return prepared, skipped
