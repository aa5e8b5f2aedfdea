"""Weight streams for in-place sync: flatten buckets lazily, pack buckets, check fused groups, copy into a module.

A sync hands the engine either (name, tensor) pairs or buckets (lists of pairs), as a list or a lazy iterator —
the trainer's gatherer yields buckets as it all-gathers them. Nothing here materializes the whole model: pairs flow
through one at a time, so peak extra memory is whatever the producer keeps alive.
"""
from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import torch

from .types import WeightPair, WeightsInput, WeightSyncError


def _is_pair(item) -> bool:
    return (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)
            and isinstance(item[1], torch.Tensor))


def iter_weight_pairs(weights: WeightsInput) -> Iterator[WeightPair]:
    """(name, tensor) pairs from pairs or from buckets of pairs, lazily.

    The input's kind is checked here, eagerly (its first item is looked at now): a sync must not discover a wrong
    input half-way through loading. A malformed later item is a TypeError when it is reached."""
    if isinstance(weights, (Mapping, str, torch.Tensor)):
        raise TypeError("weights must be (name, tensor) pairs or buckets of them (for a state dict: .items()), "
                        f"got {type(weights).__name__}")
    it = iter(weights)
    first = next(it, None)
    if first is None:
        return iter(())
    if _is_pair(first):
        return _pairs(first, it)
    _check_bucket(first)
    return _flatten(first, it)


def _pairs(first: WeightPair, rest: Iterator) -> Iterator[WeightPair]:
    yield first
    for item in rest:
        if not _is_pair(item):
            raise TypeError(f"weights: expected (name, tensor) pairs throughout, got {type(item).__name__}")
        yield item


def _check_bucket(bucket) -> None:
    if isinstance(bucket, (str, torch.Tensor, tuple)) or not isinstance(bucket, Iterable):
        raise TypeError(f"weights: expected (name, tensor) pairs or buckets (lists) of them, got "
                        f"{type(bucket).__name__}")


def _flatten(first, rest: Iterator) -> Iterator[WeightPair]:
    for bucket in itertools.chain([first], rest):
        _check_bucket(bucket)
        for item in bucket:
            if not _is_pair(item):
                raise TypeError(f"weights: bucket items must be (name, tensor) pairs, got {type(item).__name__}")
            yield item


def is_materialized(weights: WeightsInput) -> bool:
    """Whether the input can be iterated twice (a list/tuple of pairs or of lists of pairs), so names can be checked
    before anything is loaded."""
    return isinstance(weights, (list, tuple)) and all(isinstance(b, (list, tuple)) for b in weights)


def bucket_by_bytes(pairs: Iterable[WeightPair], bucket_bytes: int, *,
                    pack: bool = False) -> Iterator[list[WeightPair]]:
    """Group pairs into buckets of at most `bucket_bytes` (a tensor larger than that is a bucket of its own).

    pack=True copies each bucket into one flat buffer and yields views into it — the layout an all-gather or a
    broadcast of one flat bucket produces; a new bucket starts when dtype or device changes.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}")
    bucket: list[WeightPair] = []
    size = 0
    for name, tensor in pairs:
        nbytes = tensor.numel() * tensor.element_size()
        breaks_layout = bucket and (tensor.dtype != bucket[0][1].dtype or tensor.device != bucket[0][1].device)
        if bucket and (size + nbytes > bucket_bytes or breaks_layout):
            yield _pack(bucket) if pack else bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield _pack(bucket) if pack else bucket


def _pack(bucket: list[WeightPair]) -> list[WeightPair]:
    flat = torch.cat([t.detach().reshape(-1) for _, t in bucket])
    out, offset = [], 0
    for name, tensor in bucket:
        out.append((name, flat[offset:offset + tensor.numel()].view(tensor.shape)))
        offset += tensor.numel()
    return out


def _split_name(name: str) -> tuple[str, str, str]:
    """'a.b.q_proj.weight' -> ('a.b', 'q_proj', 'weight')."""
    module, _, param = name.rpartition(".")
    parent, _, leaf = module.rpartition(".")
    return parent, leaf, param


def fused_group_gaps(names: Iterable[str], packed_modules_mapping: Mapping[str, Sequence[str]]) -> list[str]:
    """Names missing from fused groups that the update touches only in part.

    vLLM fuses q/k/v (and gate/up) into one parameter; its layerwise reload rebuilds a fused layer from whatever
    part of it arrived in one update, and leaves the rest uninitialized. An update must therefore carry every
    member of each fused group it touches.
    """
    member_of = {member: members for members in packed_modules_mapping.values() if len(members) > 1
                 for member in members}
    seen: set[tuple[str, str, str]] = set()
    for name in names:
        seen.add(_split_name(name))
    missing = []
    for parent, leaf, param in sorted(seen):
        for member in member_of.get(leaf, ()):
            if (parent, member, param) not in seen:
                missing.append(f"{parent}.{member}.{param}")
    return sorted(set(missing))


def check_known_names(names: Iterable[str], known: set[str] | None) -> None:
    if known is None:
        return
    unknown = sorted(set(names) - known)
    if unknown:
        shown = ", ".join(unknown[:6]) + (f" (+{len(unknown) - 6} more)" if len(unknown) > 6 else "")
        raise WeightSyncError(f"unknown parameter names (not in the engine's checkpoint): {shown}")


def check_fused_groups(names: Iterable[str], packed_modules_mapping: Mapping[str, Sequence[str]]) -> None:
    gaps = fused_group_gaps(names, packed_modules_mapping)
    if gaps:
        shown = ", ".join(gaps[:6]) + (f" (+{len(gaps) - 6} more)" if len(gaps) > 6 else "")
        raise WeightSyncError(f"the update splits fused parameter groups; also send: {shown}")


# transformers >= 4.52 names Qwen-VL submodules model.language_model.* / model.visual.*; checkpoints saved in the
# older layout (and some producers) use model.* / visual.*. Both name the same parameter.
_LEGACY_PREFIXES = (("model.language_model.", "model."), ("model.visual.", "visual."))


def name_variants(name: str) -> list[str]:
    """The same Qwen-VL parameter under both prefixes."""
    for new, old in _LEGACY_PREFIXES:
        if name.startswith(new):
            return [name, old + name[len(new):]]
    if name.startswith("visual."):
        return [name, "model." + name]
    if name.startswith("model."):
        return [name, "model.language_model." + name[len("model."):]]
    return [name]


def checkpoint_weight_names(model_dir: str | Path) -> set[str] | None:
    """Names a model dir's safetensors hold (both Qwen-VL prefixes for a VL model), read from the headers only;
    None when the dir has no safetensors files."""
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        return None
    names: set[str] = set()
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            names.update(handle.keys())
    if any(n.startswith(("visual.", "model.visual.")) for n in names):
        names = {variant for n in names for variant in name_variants(n)}
    return names


def parameter_lookup(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """name -> tensor for every parameter and persistent buffer, under both the current and the legacy Qwen-VL
    prefixes."""
    table: dict[str, torch.Tensor] = dict(module.named_parameters())
    for name, buf in module.named_buffers():
        table.setdefault(name, buf)
    for name, tensor in list(table.items()):
        for new, old in _LEGACY_PREFIXES:
            if name.startswith(new):
                table.setdefault(old + name[len(new):], tensor)
    return table


@torch.no_grad()
def copy_into_module(lookup: Mapping[str, torch.Tensor], pairs: Iterable[WeightPair]) -> tuple[int, int]:
    """Copy each pair into the tensor of that name (dtype/device converted by copy_); returns (tensors, bytes).

    The HF fallback's sync and the benchmark's stand-in sink when vLLM is missing."""
    count = nbytes = 0
    for name, tensor in pairs:
        target = lookup.get(name)
        if target is None:
            raise WeightSyncError(f"unknown parameter name {name!r}")
        if target.shape != tensor.shape:
            raise WeightSyncError(f"{name}: shape {tuple(tensor.shape)} does not match the model's "
                                  f"{tuple(target.shape)}")
        target.copy_(tensor, non_blocking=True)
        count += 1
        nbytes += tensor.numel() * tensor.element_size()
    return count, nbytes
