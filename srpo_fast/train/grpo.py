"""Stage 2: reflection-aware GRPO. One step, top to bottom:

    records (this rank's share) → rollout engine (n samples each, engine token ids)
    → reward (SRPO preset) → group advantages + accuracy filter               (experience.py)
    → share item facts → plan balanced micro-batches → move items to their rank → pack      (batches.py)
    → [old / reference log-probs] → ppo_epochs x mini_batches optimizer steps with grpo_loss  (policy_update)
    → stream the updated weights into the engine in buckets → metrics, checkpoint

With ppo_epochs = mini_batches = 1 (SRPO's recipe) the update is on-policy: the ratio's "old" log-probs are the
current ones detached (ratio exactly 1, gradient = the policy gradient), so no separate old-log-prob pass runs.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from srpo_fast.config import Config, ConfigError
from srpo_fast.data.packing import MRopeIndexer
from srpo_fast.kernels import grpo_loss
from srpo_fast.models import is_vision_language, iter_full_weights, packed_token_logprobs
from srpo_fast.models.processor import load_processor
from srpo_fast.rollout import build_engine
from srpo_fast.utils.distributed import all_reduce_dict, is_main, rank, world_size
from srpo_fast.utils.metrics import MetricSums
from srpo_fast.utils.telemetry import PhaseTimer, gpu_sampler

from .batches import MicroBatch, StepItems, plan_mini_batch, share_items, split_mini_batches
from .experience import collect_experience, step_metrics
from .run import DataOrder, Run, build_policy, device_memory, load_train_records, plan_run, start_run
from .validation import load_val_records, validate

StepCallback = Callable[[int, Run, Any, dict], None]
LOSS_MEAN_KEYS = ("clip_frac_low", "clip_frac_high", "clip_frac_dual", "ratio_mean", "approx_kl",
                  "entropy_mean", "kl", "rollout_logprob_abs_diff")


def rollout_dtype(cfg: Config) -> str:
    """The dtype the engine holds the policy's weights in: model.dtype unless rollout.dtype says otherwise."""
    return cfg.rollout.dtype or cfg.model.dtype


def engine_options(cfg: Config) -> dict:
    """What the trainer adds to the `rollout` section's engine settings: its dtype, prompt limits, image bounds,
    sleep mode."""
    return dict(dtype=rollout_dtype(cfg), max_prompt_tokens=cfg.data.max_prompt_tokens,
                on_overlong_prompt="skip", min_pixels=cfg.model.min_pixels, max_pixels=cfg.model.max_pixels,
                seed=cfg.train.seed + rank(), max_images_per_prompt=cfg.data.max_images_per_prompt,
                enable_sleep_mode=True)  # the one sleeping engine of this process (docs/gpu.md)


def sync_weights(run: Run, engine) -> dict[str, float]:
    """Stream the policy's trainable weights into the engine (collective: every rank gathers every bucket)."""
    dtype = getattr(torch, rollout_dtype(run.cfg))
    buckets = iter_full_weights(run.model, bucket_bytes=run.cfg.rollout.sync_bucket_mb << 20, only_trainable=True,
                                dtype=dtype)
    stats = engine.update_weights(buckets)
    return {"sync/tensors": float(stats.tensors), "sync/GB": stats.bytes / 1e9}


def build_reference(cfg: Config, run: Run):
    """A frozen, sharded copy of the starting policy for the KL term (only when algo.kl_coef > 0)."""
    return build_policy(cfg, run.model_path, trainable=False)


def grpo_note(cfg: Config) -> str:
    """The start-up line's GRPO part: what the filter and dynamic sampling do to the per-step numbers."""
    algo = cfg.algo
    if not algo.filter_groups:
        return "no accuracy filter"
    note = f"the accuracy filter [{algo.filter_low:g}, {algo.filter_high:g}] trains only the groups it keeps"
    if algo.dynamic_sampling:
        note += (f"; dynamic sampling refills to {cfg.train.prompts_per_step} kept groups with up to "
                 f"{algo.max_gen_rounds} generation rounds per step")
    return note


def no_update_reason(cfg: Config, totals: dict[str, float]) -> str:
    """Why a step trained on nothing (its items were all filtered out or invalid), for a loud step line."""
    if cfg.algo.filter_groups and totals["groups/present"] and not totals["groups/kept"]:
        return (f"the accuracy filter dropped all {int(totals['groups/present'])} groups (first-answer accuracy "
                f"outside [{cfg.algo.filter_low}, {cfg.algo.filter_high}] in every group; a model that never "
                f"answers in the expected format scores 0 everywhere: start from stage 1, or algo.filter_groups=false)")
    return (f"no valid sample among {int(totals['samples'])} (invalid {int(totals['invalid_samples'])}, "
            f"skipped prompts {int(totals['skipped_prompts'])})")


def check_grpo_config(cfg: Config) -> None:
    if cfg.train.prompts_per_step % world_size():
        raise ConfigError(f"train.prompts_per_step={cfg.train.prompts_per_step} must be divisible by the "
                          f"{world_size()} ranks")


def engine_mismatch(micro: MicroBatch, logp: torch.Tensor) -> torch.Tensor:
    """Masked mean |trainer log-prob - engine log-prob| before the update: ~0 when the engine holds the policy's
    weights and numerics agree; a jump means a stale or broken weight sync (0 when the engine gave none)."""
    if micro.behavior_logprobs is None:
        return torch.zeros((), device=logp.device)
    mask = micro.batch.loss_mask
    return ((logp.detach().float() - micro.behavior_logprobs).abs() * mask).sum() / mask.sum().clamp(min=1.0)


def mini_batch_count(items: StepItems, wanted: int) -> int:
    """algo.mini_batches, or fewer when the filter kept fewer groups than that: a mini-batch holds whole groups, so
    a thin step takes fewer (whole-group) optimizer steps instead of failing."""
    return max(1, min(wanted, len({fact.group for fact in items.facts})))


def policy_update(cfg: Config, run: Run, items: StepItems, rope_index, ref_model) -> dict[str, float]:
    """ppo_epochs x mini_batches optimizer steps on the step's items (all ranks'); returns reduced loss metrics.
    Collective."""
    algo, temperature = cfg.algo, cfg.rollout.temperature
    minis = [plan_mini_batch(items, idx, max_tokens=cfg.train.max_tokens_per_microbatch, device=run.device,
                             rope_index=rope_index, attention_cost=cfg.train.attention_cost,
                             on_overlong=cfg.train.on_overlong)
             for idx in split_mini_batches(items.facts, mini_batch_count(items, algo.mini_batches))]
    on_policy = algo.ppo_epochs == 1 and len(minis) == 1  # then "old" is the current log-prob, detached
    with torch.no_grad():
        for micro in (micro for mini in minis for micro in mini.micro_batches):
            if not on_policy:
                micro.old_logprobs = packed_token_logprobs(run.model, micro.batch, temperature=temperature)
            if ref_model is not None:
                micro.ref_logprobs = packed_token_logprobs(ref_model, micro.batch, temperature=temperature)
    sums, steps = MetricSums(), []  # pg_loss: micro-batch losses add up to each optimizer step's loss
    run.optimizer.zero_grad(set_to_none=True)
    for _ in range(algo.ppo_epochs):
        for mini in minis:
            normalizer = max(mini.normalizer(algo.aggregation), 1.0)  # global: the same on every rank
            for micro in mini.micro_batches:
                batch = micro.batch
                logp, entropy = packed_token_logprobs(run.model, batch, temperature=temperature, return_entropy=True)
                old = micro.old_logprobs if micro.old_logprobs is not None else logp.detach()
                loss, metrics = grpo_loss(
                    logp, old, micro.advantages, batch.loss_mask, batch.response_cu_seqlens, micro.ref_logprobs,
                    clip_low=algo.clip_low, clip_high=algo.clip_high, dual_clip=algo.dual_clip,
                    kl_coef=algo.kl_coef, kl_estimator=algo.kl_estimator, entropy=entropy,
                    entropy_coef=algo.entropy_coef, aggregation=algo.aggregation, is_level=algo.is_level,
                    max_response_len=cfg.rollout.max_tokens, normalizer=normalizer, check=False)
                loss.backward()
                metrics["rollout_logprob_abs_diff"] = engine_mismatch(micro, old)
                sums.add({**metrics, "pg_loss": loss}, batch.loss_mask.sum(), max_keys=("ratio_max",),
                         sum_keys=("pg_loss",))
            steps.append(run.optimizer_step())
    keys = [k for k in LOSS_MEAN_KEYS if k != "kl" or ref_model is not None]
    out = {f"loss/{k}": v for k, v in sums.reduce(keys, max_keys=("ratio_max",), sum_keys=("pg_loss",)).items()}
    out["loss/pg_loss"] /= len(steps)
    out.update({"loss/grad_norm": sum(s["grad_norm"] for s in steps) / len(steps),
                "train/skipped_updates": sum(s["skipped_update"] for s in steps), "train/lr": steps[-1]["lr"],
                "train/optimizer_steps": float(len(steps)),
                "train/microbatches": float(sum(len(m.micro_batches) for m in minis)),
                "train/overlong_skipped": float(sum(m.skipped for m in minis))})
    return out


def train_grpo(cfg: Config, callbacks: Sequence[StepCallback] = ()) -> Path:
    """Run stage 2 to the end (resuming when a checkpoint exists); returns the run dir.

    callbacks: called on every rank after each step's weight sync as callback(step, run, engine, metrics), e.g.
    for extra evaluation with the live engine (metrics is the step's dict, to add to before it is logged)."""
    check_grpo_config(cfg)
    records = load_train_records(cfg)
    order = DataOrder(len(records), cfg.train.prompts_per_step, cfg.train.seed, cfg.data.shuffle)
    plan = plan_run(cfg, order, samples_per_step=cfg.train.prompts_per_step * cfg.rollout.n,
                    optimizer_steps_per_step=cfg.algo.ppo_epochs * cfg.algo.mini_batches, note=grpo_note(cfg))
    run = start_run(cfg, plan)
    total = plan.steps
    processor = load_processor(run.model_path, min_pixels=cfg.model.min_pixels, max_pixels=cfg.model.max_pixels)
    tokenizer = getattr(processor, "tokenizer", processor)

    def count_tokens_batch(texts: list[str]) -> list[int]:  # the length term counts tokens, not words
        return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]

    engine = build_engine(cfg.rollout, run.model_path, **engine_options(cfg))
    if run.start_step > 0:  # resumed: the engine started from the base weights
        sync_weights(run, engine)
    rope_index = MRopeIndexer(run.model) if is_vision_language(run.model) else None
    ref_model = build_reference(cfg, run) if cfg.algo.kl_coef > 0 else None
    val_records = load_val_records(cfg)
    if val_records and cfg.train.val_before_train and run.start_step == 0:
        run.logger.log(0, validate(cfg, engine, val_records, count_tokens_batch))
    progress = tqdm(total=total, initial=run.start_step, desc="srpo grpo", unit="step",
                    disable=not (cfg.log.progress and is_main()))
    for step in range(run.start_step + 1, total + 1):
        timer = PhaseTimer(gpu_sampler(run.device))
        start = time.perf_counter()
        experience = collect_experience(cfg, engine, records, order, step, count_tokens_batch, timer)
        with timer("sleep"):  # frees the KV cache and moves the engine's weights off the GPU for training
            engine.sleep()
        with timer("train"):
            items = share_items(experience.items)
            run.model.train()
            metrics = policy_update(cfg, run, items, rope_index, ref_model) if len(items) else {}
        with timer("sync"):  # weights first, KV cache last: never the KV cache beside the sync's buffers
            engine.wake_up(["weights"])
            if len(items):
                metrics.update(sync_weights(run, engine))
            engine.wake_up(["kv_cache"])
        if val_records and (step % cfg.train.val_every == 0 or step == total):
            with timer("validate"):
                metrics.update(validate(cfg, engine, val_records, count_tokens_batch))
        for callback in callbacks:
            callback(step, run, engine, metrics)
        totals = all_reduce_dict(experience.sums, op="sum")
        metrics.update(step_metrics(totals), **experience.totals)
        metrics["train/no_update"] = float(not len(items))
        if not len(items) and is_main():
            print(f"[train] WARNING step {step}: NO UPDATE, the policy did not change: {no_update_reason(cfg, totals)}",
                  flush=True)
        step_s = time.perf_counter() - start
        metrics.update({f"timing/{k}_s": v for k, v in timer.seconds.items()})
        metrics.update(timer.gpu_metrics())
        metrics.update({"timing/step_s": step_s, "train/items": float(len(items)),
                        "perf/response_tokens_per_s": totals["response_tokens"] / (step_s - timer.seconds.get(
                            "validate", 0.0)),
                        "data/epoch": float(order.epoch_of(step)), "data/bad_records": totals["bad_records"]})
        metrics.update(device_memory(run.device))
        run.count_updates(metrics)
        run.logger.log(step, metrics)
        progress.update(1)
        progress.set_postfix(reward=f"{metrics['reward/total']:.3f}", acc=f"{metrics['acc/final']:.2f}",
                             **({"update": "NONE (all filtered)"} if not len(items) else {}))
        if run.end_step(step):
            break
    progress.close()
    out_dir = run.stop() if run.stopped_early else run.finish(processor)
    shutdown = getattr(engine, "shutdown", None)
    if shutdown is not None:  # last: vLLM's in-process shutdown also tears down the default process group
        shutdown()
    return out_dir
