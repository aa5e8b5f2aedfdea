"""A memory plan: bytes per GPU rank in each phase of a GRPO step, before anything is loaded.

Why: a run that cannot fit should say so before it spends minutes loading, not die of an out-of-memory error in its
first update. The trainer calls `plan_for_run` and warns when a phase exceeds the device; `python -m
srpo_fast.train.memory` prints the plans for the paper's scales (7B on 8×80 GB, 32B on 4 nodes × 8 × 80 GB).

What is exact and what is estimated:
  exact      parameter, gradient and Adam-state bytes per rank: counted from the model built on the meta device, with
             FSDP2's dim-0 split (rank 0 holds the most rows); tests compare them to the tensors of a loaded model.
  estimated  activations of one packed micro-batch (a per-token count of the tensors a Qwen2 decoder layer saves
             for backward; with checkpointing, each layer's input plus one layer recomputed), the all-gathered FSDP
             units, vLLM's weights and KV cache (its `gpu_memory_utilization` share of the device), and a fixed
             CUDA-context reserve. The activation estimate is checked against a measurement within ACTIVATION_TOLERANCE.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

GiB = 1 << 30
CONTEXT_RESERVE = 1 * GiB  # CUDA context, NCCL buffers, allocator slack per process (a round figure, not measured)
ENGINE_ASLEEP = 1 * GiB  # what a sleeping vLLM engine keeps (CUDA graphs, its context): a round figure
# the estimate is within ±50% of the saved-tensor bytes measured on the tiny models (CPU: measured 0.60-0.74 of them;
# the CPU's per-segment SDPA also keeps each segment's attention probabilities, which the GPU's varlen kernels do not)
ACTIVATION_TOLERANCE = 0.5
ADAM_STATES = 2  # exp_avg, exp_avg_sq: fp32 like the master weights


@dataclass(frozen=True)
class ParamInfo:
    shape: tuple[int, ...]
    trainable: bool
    unit: str  # the FSDP unit that owns it (a decoder layer / vision block, the tower, or the root)


@dataclass(frozen=True)
class ModelFacts:
    """What the plan needs of a model: its parameters (exact) and the text decoder's dimensions."""
    params: tuple[ParamInfo, ...]
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @property
    def numel(self) -> int:
        return sum(math.prod(p.shape) for p in self.params)

    @property
    def trainable_numel(self) -> int:
        return sum(math.prod(p.shape) for p in self.params if p.trainable)


def model_facts(config, *, freeze_vision: bool = True, freeze_projector: bool = False) -> ModelFacts:
    """ModelFacts of a transformers config (Qwen2.5-VL, Qwen2-VL or Qwen2), built on the meta device (no memory)."""
    from srpo_fast.models.fsdp import _sharding_units
    from srpo_fast.models.loading import _model_class, freeze_vision_parts

    with torch.device("meta"):
        model = _model_class(config.model_type)._from_config(config, dtype=torch.float32)
    freeze_vision_parts(model, vision=freeze_vision, projector=freeze_projector)
    owner = {}
    for index, unit in enumerate(_sharding_units(model)):  # blocks come before the tower that holds them
        for param in unit.parameters():
            owner.setdefault(id(param), f"{type(unit).__name__}#{index}")
    params = tuple(ParamInfo(tuple(p.shape), p.requires_grad, owner.get(id(p), "root"))
                   for p in model.parameters())
    text = config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return ModelFacts(params=params, hidden=text.hidden_size, intermediate=text.intermediate_size,
                      layers=text.num_hidden_layers, heads=text.num_attention_heads,
                      kv_heads=text.num_key_value_heads, head_dim=head_dim, vocab=text.vocab_size)


def model_facts_from_dir(path: str | Path, **freeze) -> ModelFacts:
    from transformers import AutoConfig

    return model_facts(AutoConfig.from_pretrained(Path(path), local_files_only=True), **freeze)


def shard_numel(shape: tuple[int, ...], world: int, rank: int = 0) -> int:
    """Elements of FSDP2's dim-0 shard on `rank` (torch.chunk's split: ceil(rows / world) rows per rank)."""
    if not shape:
        return 1
    rows = shape[0]
    chunk = -(-rows // world)
    start = min(rank * chunk, rows)
    return (min(start + chunk, rows) - start) * math.prod(shape[1:])


@dataclass(frozen=True)
class RunSettings:
    """The run's knobs that move memory. Defaults: the GRPO config's."""
    world: int = 1
    gpu_bytes: int = 80 * 10**9
    compute_bytes: int = 2  # bf16
    tokens_per_microbatch: int = 16384
    gradient_checkpointing: bool = False
    cpu_offload: bool = False
    kl_reference: bool = False
    engine: str = "vllm"  # vllm | hf
    gpu_memory_utilization: float = 0.5
    sync_bucket_bytes: int = 512 << 20
    max_model_len: int = 4096  # the KV cache must hold at least one sequence this long


@dataclass
class MemoryPlan:
    """Bytes per rank (rank 0, the largest shard) by component, and each phase's sum on the GPU."""
    components: dict[str, int] = field(default_factory=dict)
    phases: dict[str, int] = field(default_factory=dict)
    gpu_bytes: int = 0
    kv_cache_bytes: int = 0
    kv_cache_tokens: int = 0
    kv_bytes_per_token: int = 0

    min_kv_tokens: int = 0

    def over(self) -> dict[str, int]:
        """Phases that do not fit the device: {phase: bytes over}; "rollout KV cache" when vLLM's share leaves no room
        for one full-length sequence beside its weights."""
        over = {name: used - self.gpu_bytes for name, used in self.phases.items() if used > self.gpu_bytes}
        if self.kv_cache_tokens < self.min_kv_tokens:
            over["rollout KV cache"] = (self.min_kv_tokens - self.kv_cache_tokens) * self.kv_bytes_per_token
        return over

    def table(self) -> str:
        rows = [f"  {name:<28}{value / GiB:9.2f} GiB" for name, value in self.components.items()]
        rows += [f"  phase {name:<22}{value / GiB:9.2f} GiB{'  > device' if value > self.gpu_bytes else ''}"
                 for name, value in self.phases.items()]
        rows.append(f"  vLLM KV cache: {self.kv_cache_bytes / GiB:.2f} GiB = {self.kv_cache_tokens:,} tokens")
        return "\n".join(rows)


def parameter_bytes(facts: ModelFacts, world: int, rank: int = 0, dtype_bytes: int = 4) -> int:
    return sum(shard_numel(p.shape, world, rank) for p in facts.params) * dtype_bytes


def gradient_bytes(facts: ModelFacts, world: int, rank: int = 0) -> int:
    return sum(shard_numel(p.shape, world, rank) for p in facts.params if p.trainable) * 4


def adam_state_bytes(facts: ModelFacts, world: int, rank: int = 0) -> int:
    """exp_avg and exp_avg_sq (fp32, sharded) plus torch's fp32 `step` scalar, per trainable parameter tensor."""
    trainable = [p for p in facts.params if p.trainable]
    return sum(shard_numel(p.shape, world, rank) for p in trainable) * 4 * ADAM_STATES + 4 * len(trainable)


def activation_bytes(facts: ModelFacts, tokens: int, compute_bytes: int, checkpointing: bool) -> int:
    """Tensors saved for backward by one micro-batch of `tokens` packed tokens through the text decoder.

    Per token and layer, a Qwen2 decoder layer saves: two RMSNorm inputs upcast to fp32 (4H each) and their outputs
    (H each), q/k/v after rotary and the attention output (H + 2·kv + H), the o_proj input (H), gate and up outputs,
    the activation and the down_proj input (4·I), all in the compute dtype. With checkpointing, each layer keeps only
    its input (H) and one layer's activations exist at a time during recomputation. The head adds the final norm
    and the hidden states handed to the log-prob kernel."""
    h, i = facts.hidden, facts.intermediate
    kv = facts.kv_heads * facts.head_dim
    per_layer = 2 * 4 * h + compute_bytes * (2 * h + h + 2 * kv + h + h + 4 * i)
    head = 4 * h + 2 * compute_bytes * h
    if checkpointing:
        return tokens * (facts.layers * compute_bytes * h + per_layer + head)
    return tokens * (facts.layers * per_layer + head)


def _gathered_numel(facts: ModelFacts) -> int:
    """Elements all-gathered at once: the root unit (embeddings, final norm, LM head: gathered for the whole forward)
    plus the largest other unit twice (the one running and the one prefetched)."""
    units: dict[str, int] = {}
    for p in facts.params:
        units[p.unit] = units.get(p.unit, 0) + math.prod(p.shape)
    root = units.pop("root", 0)
    return root + 2 * max(units.values(), default=0)


def plan_memory(facts: ModelFacts, run: RunSettings) -> MemoryPlan:
    """Bytes per rank in each phase: rollout (engine awake beside the trainer's resident state), train (engine asleep,
    gradients, activations, gathered units), sync (engine weights awake, gathered buckets)."""
    world, b = run.world, run.compute_bytes
    params = parameter_bytes(facts, world)
    grads = gradient_bytes(facts, world)
    adam = adam_state_bytes(facts, world)
    reference = parameter_bytes(facts, world, dtype_bytes=b) if run.kl_reference else 0
    gathered = _gathered_numel(facts) * b * 2  # unsharded parameters and, in backward, their unsharded gradients
    acts = activation_bytes(facts, run.tokens_per_microbatch, b, run.gradient_checkpointing)
    full_weights = facts.numel * b
    on_gpu = 0 if run.cpu_offload else 1
    resident = on_gpu * (params + adam) + reference + CONTEXT_RESERVE
    if run.engine == "vllm":
        engine_awake = int(run.gpu_memory_utilization * run.gpu_bytes)
        kv = max(0, engine_awake - full_weights - CONTEXT_RESERVE)
        engine_asleep, engine_weights = ENGINE_ASLEEP, full_weights
    else:  # the HF engine keeps its own unsharded copy; its KV cache lives only inside generate
        kv = 0
        engine_awake = engine_asleep = engine_weights = full_weights
    per_token = 2 * facts.layers * facts.kv_heads * facts.head_dim * b
    plan = MemoryPlan(gpu_bytes=run.gpu_bytes, kv_cache_bytes=kv, kv_cache_tokens=kv // per_token,
                      kv_bytes_per_token=per_token, min_kv_tokens=run.max_model_len if run.engine == "vllm" else 0)
    plan.components = {"parameters (fp32 shard)": params, "gradients (fp32 shard)": grads,
                       "Adam state (fp32 shard)": adam, "KL reference": reference,
                       "gathered FSDP units": gathered, "activations (micro-batch)": acts,
                       "engine weights": engine_weights, "engine awake (vLLM share)": engine_awake,
                       "context reserve": CONTEXT_RESERVE}
    plan.phases = {"rollout": resident + engine_awake,
                   "train": resident + on_gpu * grads + gathered + acts + engine_asleep,
                   "sync": resident + engine_weights + 2 * run.sync_bucket_bytes}
    return plan


def plan_for_run(cfg, model_path: Path, world: int) -> MemoryPlan | None:
    """The plan of a training config on this machine's GPU; None on CPU (nothing to plan against)."""
    if not torch.cuda.is_available():
        return None
    facts = model_facts_from_dir(model_path, freeze_vision=cfg.model.freeze_vision,
                                 freeze_projector=cfg.model.freeze_projector)
    run = RunSettings(world=world, gpu_bytes=torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory,
                      compute_bytes=getattr(torch, cfg.model.dtype).itemsize,
                      tokens_per_microbatch=cfg.train.max_tokens_per_microbatch,
                      gradient_checkpointing=cfg.model.gradient_checkpointing, cpu_offload=cfg.train.cpu_offload,
                      kl_reference=cfg.algo.kl_coef > 0, engine=cfg.rollout.engine,
                      gpu_memory_utilization=cfg.rollout.gpu_memory_utilization,
                      sync_bucket_bytes=cfg.rollout.sync_bucket_mb << 20, max_model_len=cfg.rollout.max_model_len)
    return plan_memory(facts, run)


def warn_if_unfit(plan: MemoryPlan | None) -> bool:
    """Print a warning naming each phase that does not fit; True when all fit (or there is no plan)."""
    if plan is None or not plan.over():
        return True
    phases = ", ".join(f"{name} (+{extra / GiB:.1f} GiB)" for name, extra in plan.over().items())
    print(f"[memory] WARNING: this run is planned not to fit the {plan.gpu_bytes / GiB:.0f} GiB device in: {phases}."
          f" Try train.cpu_offload=true, model.gradient_checkpointing=true, a smaller "
          f"train.max_tokens_per_microbatch or rollout.gpu_memory_utilization, or more GPUs.\n{plan.table()}")
    return False


# The paper's models (Qwen2.5-VL-7B/-32B-Instruct config.json values, the same vision tower in both), so the plans
# print without the weights.
PAPER_MODELS = {
    "Qwen2.5-VL-7B": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                          num_key_value_heads=4, vocab_size=152064),
    "Qwen2.5-VL-32B": dict(hidden_size=5120, intermediate_size=27648, num_hidden_layers=64, num_attention_heads=40,
                           num_key_value_heads=8, vocab_size=152064),
}


def paper_config(name: str):
    from transformers import Qwen2_5_VLConfig

    text = PAPER_MODELS[name]
    vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14, window_size=112,
                  spatial_merge_size=2, temporal_patch_size=2, fullatt_block_indexes=[7, 15, 23, 31],
                  out_hidden_size=text["hidden_size"])
    return Qwen2_5_VLConfig(text_config=dict(text, tie_word_embeddings=False, max_position_embeddings=128000),
                            vision_config=vision, tie_word_embeddings=False)


PAPER_SCALES = (  # (model, ranks, where, settings)
    ("Qwen2.5-VL-7B", 8, "8 × 80 GB", dict()),
    ("Qwen2.5-VL-7B", 8, "8 × 80 GB", dict(gradient_checkpointing=True)),
    ("Qwen2.5-VL-32B", 32, "4 nodes × 8 × 80 GB", dict(gradient_checkpointing=True)),
    ("Qwen2.5-VL-32B", 32, "4 nodes × 8 × 80 GB", dict(gradient_checkpointing=True, cpu_offload=True,
                                                        gpu_memory_utilization=0.9)),
)


def main() -> None:
    for name, world, where, settings in PAPER_SCALES:
        facts = model_facts(paper_config(name))
        plan = plan_memory(facts, RunSettings(world=world, **settings))
        knobs = ", ".join(f"{k}={v}" for k, v in settings.items()) or "defaults"
        print(f"{name} ({facts.numel / 1e9:.2f} B parameters) on {where}, 16k-token micro-batches, {knobs}: "
              f"{'fits' if not plan.over() else 'DOES NOT FIT'}")
        print(plan.table())


if __name__ == "__main__":
    main()
