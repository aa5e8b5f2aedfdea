"""Loading the policy straight into FSDP2 shards: each rank reads only its own rows from the safetensors files.

Why: `load_policy` + `shard_model` has every rank hold the whole model in host memory first (7B in fp32 is ~31 GB,
so ~250 GB per 8-GPU node, and again for a KL reference). Here the model is built with its parameters on the meta
device (no memory), sharded by `shard_model`, materialized empty on its device, and each rank copies its dim-0 rows
[r*c, min((r+1)*c, n)), c = ceil(n / world) (FSDP2's Shard(0) layout) out of the memory-mapped files: host memory per
rank is about the model size divided by the world size (each tensor's rows are read with plain file reads, so no
memory-mapped file stays resident either). The values are exactly what the whole load gives (the same
dtype cast of the same stored numbers).

Buffers are not part of it: they are small and computed for real on the CPU while the model is built (rotary
frequencies), then kept across `to_empty`; a persistent buffer stored in the checkpoint is read whole.
"""
from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from .attention import attn_implementation_for
from .fsdp import shard_model
from .loading import ATTN_NAME, _as_dtype, _model_class, prepare_policy, read_model_type


@contextlib.contextmanager
def parameters_on_meta():
    """Every parameter registered inside goes to the meta device as it is registered (before the module's own
    initialization runs on it, which is then a no-op); buffers stay real. Tied parameters keep their identity."""
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


class CheckpointReader:
    """Reads whole tensors or dim-0 row ranges of the safetensors files of a model dir with plain positioned reads:
    a row range of a row-major tensor is one contiguous byte range, so only those bytes are read, into memory the
    caller then owns (no memory map whose pages would stay resident). The format: an 8-byte little-endian header
    length, a JSON header {name: {dtype, shape, data_offsets}}, then the data."""

    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        files = sorted(self.dir.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{self.dir} holds no .safetensors files")
        self.entries: dict[str, tuple[Path, torch.dtype, list[int], int]] = {}  # name → (file, dtype, shape, start)
        for file in files:
            with open(file, "rb") as handle:
                size = int.from_bytes(handle.read(8), "little")
                header = json.loads(handle.read(size))
            for name, meta in header.items():
                if name == "__metadata__":
                    continue
                if meta["dtype"] not in _SAFETENSORS_DTYPES:
                    raise ValueError(f"{file}: {name} has unsupported dtype {meta['dtype']}")
                self.entries[name] = (file, _SAFETENSORS_DTYPES[meta["dtype"]], list(meta["shape"]),
                                      8 + size + meta["data_offsets"][0])

    def resolve(self, name: str) -> str | None:
        """The stored name of a parameter, under either Qwen-VL prefix layout; None when absent."""
        from srpo_fast.rollout.weights import name_variants

        return next((n for n in name_variants(name) if n in self.entries), None)

    def shape(self, name: str) -> list[int]:
        return list(self.entries[name][2])

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        file, dtype, shape, offset = self.entries[name]
        row_bytes = math.prod(shape[1:]) * dtype.itemsize
        out = torch.empty((stop - start) * row_bytes, dtype=torch.uint8)
        with open(file, "rb", buffering=0) as handle:
            handle.seek(offset + start * row_bytes)
            view, done = memoryview(out.numpy()), 0
            while done < len(view):
                read = handle.readinto(view[done:])
                if not read:
                    raise EOFError(f"{file}: truncated while reading {name}")
                done += read
        return out.view(dtype).reshape(stop - start, *shape[1:])

    def whole(self, name: str) -> torch.Tensor:
        shape = self.shape(name)
        if not shape:  # a scalar
            file, dtype, _, offset = self.entries[name]
            return self._scalar(file, dtype, offset)
        return self.rows(name, 0, shape[0])

    @staticmethod
    def _scalar(file: Path, dtype: torch.dtype, offset: int) -> torch.Tensor:
        with open(file, "rb") as handle:
            handle.seek(offset)
            return torch.frombuffer(bytearray(handle.read(dtype.itemsize)), dtype=dtype).reshape(())


def _local_rows(param: DTensor) -> tuple[int, int]:
    """[start, stop) rows of a dim-0-sharded parameter held by this rank (torch.chunk's split, as FSDP2 shards)."""
    if not (param.device_mesh.ndim == 1 and len(param.placements) == 1 and type(param.placements[0]) is Shard
            and param.placements[0].dim == 0):
        raise ValueError(f"expected FSDP2's Shard(0) on a 1-D mesh, got {param.placements}")
    rows, world, me = param.shape[0], param.device_mesh.size(), param.device_mesh.get_local_rank()
    chunk = -(-rows // world)
    start = min(me * chunk, rows)
    stop = min(start + chunk, rows)
    local = param.to_local()
    if local.shape[0] != stop - start:
        raise RuntimeError(f"unexpected shard of a {tuple(param.shape)} parameter on mesh rank {me}: local rows "
                           f"{local.shape[0]}, expected {stop - start}")
    return start, stop


@torch.no_grad()
def materialize_from_checkpoint(model: nn.Module, model_dir: str | Path) -> dict[str, int]:
    """Fill a sharded, `to_empty`-materialized model's parameters (own rows only) and persistent buffers from the
    checkpoint in model_dir; returns {"tensors", "bytes_read"}. Every parameter must be stored (a tied alias needs
    only its source)."""
    from .weights import checkpoint_names

    names = checkpoint_names(model)
    reader = CheckpointReader(model_dir)
    count = nbytes = 0
    persistent = set(model.state_dict(keep_vars=True))
    targets = [(key, value, True) for key, value in model.named_parameters()]
    targets += [(key, value, False) for key, value in model.named_buffers() if key in persistent]
    for key, value, is_param in targets:
        stored = reader.resolve(names.get(key, key))
        if stored is None:
            if not is_param:
                continue  # a buffer the checkpoint does not hold keeps its computed value
            raise KeyError(f"{reader.dir}: no stored tensor for parameter {key} (looked for "
                           f"{names.get(key, key)!r} under both Qwen-VL prefixes)")
        if list(value.shape) != reader.shape(stored):
            raise ValueError(f"{reader.dir}: {stored} has shape {reader.shape(stored)}, the model's {key} "
                             f"{list(value.shape)}")
        if isinstance(value, DTensor):
            start, stop = _local_rows(value)
            source, local = reader.rows(stored, start, stop), value.to_local()
        else:
            source, local = reader.whole(stored), value
        local.copy_(source)  # casts to the parameter's dtype, as from_pretrained does
        count += 1
        nbytes += source.numel() * source.element_size()
        del source
    return {"tensors": count, "bytes_read": nbytes}


def load_sharded_policy(path: str | Path, *, dtype: torch.dtype | str = torch.float32,
                        param_dtype: torch.dtype | None = None, cpu_offload: bool = False,
                        device: torch.device | None = None, attn_implementation: str = ATTN_NAME,
                        freeze_vision: bool = True, freeze_projector: bool = False,
                        gradient_checkpointing: bool = False, trust_remote_code: bool = False) -> nn.Module:
    """The policy of `load_policy`, sharded with FSDP2 over the default process group, with each rank reading only
    its own shards. dtype: the stored (master) parameters' dtype; param_dtype: FSDP2's compute dtype (None: dtype);
    device: where the shards live (default: CUDA's current device, else the CPU; the CPU under cpu_offload).
    Collective (every rank calls it)."""
    from transformers import GenerationConfig

    from srpo_fast.utils.distributed import default_device

    model_type = read_model_type(path)
    if trust_remote_code:
        raise ValueError("sharded loading builds the model from transformers' own classes; trust_remote_code "
                         "models need load_policy")
    cls = _model_class(model_type)
    config = cls.config_class.from_pretrained(Path(path), local_files_only=True)
    attention = attn_implementation_for(model_type, attn_implementation)
    with parameters_on_meta():
        model = cls._from_config(config, dtype=_as_dtype(dtype), attn_implementation=attention)
    if (Path(path) / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(Path(path), local_files_only=True)
    model = prepare_policy(model, path, attn_implementation=attn_implementation, freeze_vision=freeze_vision,
                           freeze_projector=freeze_projector, gradient_checkpointing=gradient_checkpointing)
    shard_model(model, param_dtype=param_dtype, cpu_offload=cpu_offload)
    target = torch.device("cpu") if cpu_offload else (device or default_device())
    buffers = {key: buf.detach().to(target, copy=True) for key, buf in model.named_buffers()}
    model.to_empty(device=target)
    with torch.no_grad():
        for key, buf in model.named_buffers():
            buf.copy_(buffers[key])
    materialize_from_checkpoint(model, path)
    return model
