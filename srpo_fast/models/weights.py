"""Getting full weights out of a (possibly FSDP2-sharded) model, under the names of a saved HF checkpoint.

transformers 5 names parameters differently in memory and on disk: Qwen2.5-VL's `model.language_model.layers.0...`
is saved as `model.layers.0...` and `model.visual.blocks...` as `visual.blocks...`. We always emit the on-disk
names (what `save_pretrained` writes and every vLLM version loads), taken from transformers' own save-time
renaming, so they follow whatever the installed transformers does.

- `export_hf_safetensors`: a complete HF model dir (safetensors + config + tokenizer/processor), written atomically.
- `iter_full_weights`: buckets of (name, full tensor) for in-place weight sync into a rollout engine, one
  all-gather per bucket (per-parameter gathers are latency-bound: hundreds of small collectives per sync).
Both are collectives under FSDP2: every rank must call them (and consume the iterator) in the same order.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import weakref
from pathlib import Path
from typing import Literal
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Shard

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".safetensors.index.json", ".bin.index.json")
# torch 2.13 renamed all_gather_into_tensor (now deprecated, with a warning per call) to all_gather_single; 2.11
# has only the old name
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_NAME_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[str, str]] = weakref.WeakKeyDictionary()


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        from srpo_fast.utils.distributed import barrier

        barrier()


def _unwrapped_class(model: nn.Module) -> type:
    """fully_shard swaps the model's class for a generated `FSDP<Name>` subclass; return the original class."""
    for cls in type(model).__mro__:
        if not issubclass(cls, FSDPModule):
            return cls
    raise TypeError(f"cannot find the model class behind {type(model).__name__}")


def checkpoint_names(model: nn.Module) -> dict[str, str]:
    """{in-memory state-dict key: key in a checkpoint saved by `save_pretrained`} for every state-dict entry.

    transformers finds the renaming by class name, which FSDP2 changes, so for a sharded model built without
    `from_pretrained` the renaming is read off an unsharded meta-device twin of the same class and config.
    """
    cached = _NAME_CACHE.get(model)
    if cached is not None:
        return cached
    from transformers import PreTrainedModel
    from transformers.core_model_loading import revert_weight_conversion

    keys = list(model.state_dict(keep_vars=True).keys())
    if not isinstance(model, PreTrainedModel):
        names = {k: k for k in keys}
    else:
        reference = model
        if isinstance(model, FSDPModule) and getattr(model, "_weight_conversions", None) is None:
            with torch.device("meta"):
                reference = _unwrapped_class(model)._from_config(model.config)
        placeholders = {k: torch.empty(0) for k in keys}
        key_of = {id(t): k for k, t in placeholders.items()}
        renamed = revert_weight_conversion(reference, placeholders)
        names = {key_of[id(t)]: new for new, t in renamed.items() if id(t) in key_of}
        if len(names) != len(keys) or len(set(names.values())) != len(keys):
            raise ValueError(f"{type(reference).__name__}: transformers saves some weights through a many-to-one "
                             "conversion; only one-to-one renamings are supported")
    _NAME_CACHE[model] = names
    return names


def _tied_aliases(model: nn.Module) -> set[str]:
    """State-dict keys that alias another parameter (lm_head.weight under tie_word_embeddings); HF does not save
    them, safetensors cannot hold them, and vLLM re-ties them itself."""
    every = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    return every - {name for name, _ in model.named_parameters()}


def iter_full_weights(model: nn.Module, *, bucket_bytes: int = 512 << 20, only_trainable: bool = False,
                      dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                      gather: Literal["bucket", "param"] = "bucket") -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Yield lists of (checkpoint name, full tensor), each list at most `bucket_bytes` (a tensor bigger than that
    comes alone in its own list).

    Parameters and persistent buffers, in state-dict order, tied aliases skipped. only_trainable=True skips
    frozen parameters (e.g. the vision tower), so a weight sync moves only what the optimizer changed.
    dtype: cast each tensor (e.g. to the engine's bf16); device: move each tensor there (default: the device of
    the parameter's local shard, so CPU for a CPU-offloaded model). Sharded values are FSDP2's master parameters
    (e.g. fp32 under a bf16 param_dtype), cast to dtype.
    gather="bucket" (default): one all-gather per bucket for all its FSDP-sharded tensors (shards cast to dtype
    first, so bf16 moves half the bytes of fp32); peak memory while gathering is the bucket's full tensors plus
    its gather buffer (about two buckets). "param": one `DTensor.full_tensor()` per tensor (the reference:
    bit-identical output, one latency-bound collective per parameter, peak one bucket plus one tensor).
    Gathering is a collective: every rank must run the iterator to the end.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}")
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype or None, got {dtype!r}")
    if gather not in ("bucket", "param"):
        raise ValueError(f"gather must be 'bucket' or 'param', got {gather!r}")
    if gather == "param":
        return _full_weight_buckets(model, bucket_bytes, only_trainable, dtype, device)
    return _gathered_buckets(model, bucket_bytes, only_trainable, dtype, device)


def _full_weight_buckets(model, bucket_bytes, only_trainable, dtype, device):
    names = checkpoint_names(model)
    aliases = _tied_aliases(model)
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for key, value in model.state_dict(keep_vars=True).items():
        if key in aliases or (only_trainable and not value.requires_grad):
            continue
        with torch.no_grad():  # never across a yield: grad mode would stay off in the consumer's code
            full = value.full_tensor() if isinstance(value, DTensor) else value.detach()
            if dtype is not None:
                full = full.to(dtype)
            if device is not None:
                full = full.to(device)
        nbytes = full.numel() * full.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((names[key], full))
        size += nbytes
    if bucket:
        yield bucket


def _plan_buckets(model, bucket_bytes, only_trainable, dtype) -> list[list[tuple[str, torch.Tensor]]]:
    """(checkpoint name, state-dict value) per bucket, by the same rule as `_full_weight_buckets` but from shapes
    and dtypes alone (identical on every rank), so a bucket can be gathered before any of it is materialized."""
    names = checkpoint_names(model)
    aliases = _tied_aliases(model)
    plan: list[list[tuple[str, torch.Tensor]]] = []
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for key, value in model.state_dict(keep_vars=True).items():
        if key in aliases or (only_trainable and not value.requires_grad):
            continue
        nbytes = value.numel() * (dtype or value.dtype).itemsize
        if bucket and size + nbytes > bucket_bytes:
            plan.append(bucket)
            bucket, size = [], 0
        bucket.append((names[key], value))
        size += nbytes
    if bucket:
        plan.append(bucket)
    return plan


def _dim0_sharded(value: torch.Tensor) -> bool:
    """A DTensor sharded on dim 0 over a 1-D mesh: what FSDP2's fully_shard makes (the one layout gathered in
    bulk; any other, e.g. HSDP's 2-D mesh, falls back to full_tensor())."""
    return (isinstance(value, DTensor) and value.device_mesh.ndim == 1 and len(value.placements) == 1
            and type(value.placements[0]) is Shard and value.placements[0].dim == 0 and value.dim() > 0)


def _comm_device(mesh) -> torch.device:
    if mesh.device_type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(mesh.device_type)


def _gathered_buckets(model, bucket_bytes, only_trainable, dtype, device):
    for planned in _plan_buckets(model, bucket_bytes, only_trainable, dtype):
        with torch.no_grad():  # never across a yield: grad mode would stay off in the consumer's code
            full: dict[int, torch.Tensor] = {}
            groups: dict[tuple, list[int]] = {}  # (mesh, gathered dtype) → indices: one all-gather each
            for i, (_, value) in enumerate(planned):
                if _dim0_sharded(value):
                    groups.setdefault((value.device_mesh, dtype or value.dtype), []).append(i)
                elif isinstance(value, DTensor):
                    full[i] = value.full_tensor()
                else:
                    full[i] = value.detach()
            for (mesh, gather_dtype), indices in groups.items():
                tensors = _all_gather_dim0([planned[i][1] for i in indices], mesh, gather_dtype)
                full.update(zip(indices, tensors))
            bucket = []
            for i, (name, value) in enumerate(planned):
                tensor = full.pop(i)
                if dtype is not None:
                    tensor = tensor.to(dtype)
                target = device if device is not None else (
                    value.to_local().device if isinstance(value, DTensor) else None)
                if target is not None:
                    tensor = tensor.to(target)
                bucket.append((name, tensor))
        yield bucket
        del bucket


def _all_gather_dim0(values: list[DTensor], mesh, dtype: torch.dtype) -> list[torch.Tensor]:
    """Full tensors of dim-0-sharded DTensors on one 1-D mesh, with ONE all_gather_into_tensor.

    Shards are uneven (Shard(0) gives rank r rows [r*c, min((r+1)*c, n)), c = ceil(n / world), possibly none),
    so every rank packs each local shard, cast to dtype, into a slot of c rows; the gathered buffer is
    [world, sum of slots], and each full tensor is the concatenation of its slot's real rows over ranks.
    Returned on the communication device (the mesh's: CUDA for NCCL even when the shards are CPU-offloaded).
    """
    world, me = mesh.size(), mesh.get_local_rank()
    comm = _comm_device(mesh)
    layout = []  # (offset, rows per slot, elements per row)
    total = 0
    for value in values:
        rows = value.shape[0]
        per_row = value.numel() // rows if rows else 0
        slot_rows = -(-rows // world)
        local = value.to_local()
        mine = max(0, min(slot_rows, rows - me * slot_rows))
        if tuple(local.shape) != (mine, *value.shape[1:]):
            raise RuntimeError(f"unexpected dim-0 shard of a {tuple(value.shape)} tensor on mesh rank {me}: local "
                               f"shape {tuple(local.shape)}, expected {(mine, *value.shape[1:])}")
        layout.append((total, slot_rows, per_row))
        total += slot_rows * per_row
    send = torch.empty(total, dtype=dtype, device=comm)
    for value, (offset, _, _) in zip(values, layout):
        local = value.to_local()
        send[offset:offset + local.numel()].copy_(local.reshape(-1), non_blocking=True)
    received = torch.empty(world * total, dtype=dtype, device=comm)  # gloo wants it flat: world x send's shape
    _all_gather_flat(received, send, group=mesh.get_group())
    del send
    received = received.view(world, total)
    out = []
    for value, (offset, slot_rows, per_row) in zip(values, layout):
        rows = value.shape[0]
        parts = [received[r, offset:offset + min(slot_rows, rows - r * slot_rows) * per_row]
                 for r in range(world) if r * slot_rows < rows]
        out.append(torch.cat(parts).view(value.shape) if parts else received.new_empty(value.shape))
    return out


def export_hf_safetensors(model: nn.Module, out_dir: str | Path, *, processor=None,
                          assets_from: str | Path | None = None, dtype: torch.dtype | None = None,
                          max_shard_bytes: int = 5 << 30) -> Path:
    """Write a loadable HF model dir (transformers `from_pretrained` and vLLM) from a sharded or plain model.

    Rank 0 gathers the full state dict to CPU and writes `model.safetensors` (or shards + index past
    max_shard_bytes), config.json and generation_config.json into a temp dir next to out_dir, then swaps it in
    with a rename, so readers never see a half-written dir. assets_from: a model dir whose tokenizer / processor /
    chat-template files are copied (use the dir the model was loaded from; it keeps the processor files vLLM
    needs, e.g. the video processor config); processor: an object with `save_pretrained`, saved after that copy.
    Collective: all ranks call it.
    """
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be > 0, got {max_shard_bytes}")
    if processor is not None and not hasattr(processor, "save_pretrained"):
        raise TypeError(f"processor must have save_pretrained, got {type(processor).__name__}")
    if assets_from is not None and not Path(assets_from).is_dir():
        raise FileNotFoundError(f"assets_from is not a directory: {assets_from}")
    out = Path(out_dir).resolve()
    names = checkpoint_names(model)
    aliases = _tied_aliases(model)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if _is_main():
        tensors = {}
        for key, tensor in full.items():
            if key in aliases:
                continue
            tensor = tensor.detach()
            tensors[names[key]] = (tensor.to(dtype) if dtype is not None else tensor).contiguous()
        remove_stale_exports(out)
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
        tmp.mkdir(parents=True)
        if assets_from is not None:
            _copy_assets(Path(assets_from), tmp)
        _save_weights(tensors, tmp, max_shard_bytes)
        _save_configs(model, tmp, dtype)
        if processor is not None:
            _save_processor(processor, tmp)
        _swap_in(tmp, out)
    del full
    _barrier()
    return out


def remove_stale_exports(out: Path) -> None:
    """Delete what killed exports into `out` left behind, whatever their pid: partial `.NAME.tmp-*` dirs, and
    `.NAME.old-*` dirs once `out` itself exists (before that, an old one may be the only complete copy)."""
    if not out.parent.is_dir():
        return
    for stale in out.parent.glob(f".{out.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    if out.is_dir():
        for stale in out.parent.glob(f".{out.name}.old-*"):
            shutil.rmtree(stale, ignore_errors=True)


def _copy_assets(src: Path, dst: Path) -> None:
    for item in src.iterdir():
        if item.is_file() and item.name != "config.json" and not item.name.endswith(_WEIGHT_SUFFIXES):
            shutil.copy2(item, dst / item.name)


def _save_weights(tensors: dict[str, torch.Tensor], out: Path, max_shard_bytes: int) -> None:
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], out / "model.safetensors", metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, out / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _save_configs(model: nn.Module, out: Path, dtype: torch.dtype | None) -> None:
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError(f"{type(model).__name__} has no .config; export needs a transformers model")
    if dtype is not None:
        config = copy.deepcopy(config)
        config.dtype = dtype
    config.save_pretrained(out)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        generation_config.save_pretrained(out)


def _save_processor(processor, out: Path) -> None:
    """save_pretrained, then name the nearest transformers class as processor_class: vLLM and AutoProcessor resolve
    that name, and cannot resolve our own subclasses (e.g. models.processor.ImageOnlyQwenVLProcessor)."""
    import transformers

    processor.save_pretrained(out)
    config_file = out / "processor_config.json"
    if not config_file.exists():
        return
    known = next(cls.__name__ for cls in type(processor).__mro__
                 if getattr(transformers, cls.__name__, None) is cls)
    config = json.loads(config_file.read_text())
    if config.get("processor_class") != known:
        config["processor_class"] = known
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _swap_in(tmp: Path, out: Path) -> None:
    """Replace out with tmp: rename the old dir aside, rename tmp into place, then delete the old one."""
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
