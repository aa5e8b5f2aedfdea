"""What both training stages share: the policy under FSDP2 and its optimizer step, the data order, resume and
checkpoints, metrics on the main rank, and the final export.

Resume needs no data-loader state: the order of records is a pure function of (seed, epoch), and step k always
takes the same slice of it, so the checkpoint's step number is the loader position. Every `train.save_every` steps
(and at the end) a DCP checkpoint is written atomically (utils/checkpoint.py); with `train.resume` a restarted run
continues from the newest complete one, and metrics logged after it are dropped, so no step is counted twice
(a run killed before its first checkpoint starts its metrics afresh). Leftovers of killed saves and exports, of any
process, are cleaned before the run writes anything, so a rerun on a disk that filled up can free the space first.

A run that ends without a single optimizer update (every group filtered, every gradient non-finite, ...) has not
trained anything: it raises `NoUpdateError` rather than exporting the unchanged model as if it had.
"""
from __future__ import annotations

import math
import random
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from srpo_fast.config import Config, config_to_dict, save_config
from srpo_fast.models import build_lr_scheduler, build_optimizer, clip_grad_norm, load_policy, shard_model
from srpo_fast.models.sharded_loading import load_sharded_policy
from srpo_fast.models.weights import remove_stale_exports
from srpo_fast.utils.checkpoint import (clean_partial, latest_checkpoint, load_checkpoint, save_checkpoint,
                                       storage_error)
from srpo_fast.utils.distributed import (all_reduce_dict, barrier, default_device, is_main, rank, seed_everything,
                                         world_size)
from srpo_fast.utils.metrics import MetricsLogger

CHECKPOINTS = "checkpoints"
FINAL_MODEL = "final_model"


class NoUpdateError(RuntimeError):
    """The run finished its steps without one optimizer update: the model is unchanged."""


def resolve_model_path(cfg: Config) -> Path:
    """cfg.model.path, or for "tiny" the offline tiny kit's Qwen2.5-VL, built once by rank 0 under output_dir."""
    if cfg.model.path != "tiny":
        path = Path(cfg.model.path)
        if not path.is_dir():
            raise FileNotFoundError(f"model.path {path} is not a directory (a local Hugging Face model dir)")
        return path
    from srpo_fast.tiny import ensure_tiny_kit

    kit_dir = Path(cfg.train.output_dir) / "tiny_kit"
    language_std = cfg.model.tiny_language_std
    if is_main():
        ensure_tiny_kit(kit_dir, seed=cfg.train.seed, language_std=language_std)
    barrier()
    return ensure_tiny_kit(kit_dir, seed=cfg.train.seed, language_std=language_std)["vl"]


def load_train_records(cfg: Config) -> list[dict]:
    """data.train_files, or the synthetic visual task when none are given. Skipped rows are reported, never hidden."""
    if not cfg.data.train_files:
        from srpo_fast.data.synthetic import make_dataset

        return make_dataset(cfg.data.synthetic_size, seed=cfg.train.seed, difficulty=cfg.data.synthetic_difficulty,
                            tasks=tuple(cfg.data.synthetic_tasks))
    from srpo_fast.data.records import load_records

    records, report = load_records(cfg.data.train_files, lazy_images=True,
                                   allow_outside_paths=cfg.data.allow_outside_paths)
    if report.skipped and is_main():
        print(f"[data] {report.describe()}")
    if not records:
        raise ValueError(f"no usable records in {cfg.data.train_files}")
    return records


class DataOrder:
    """Which records step k (1-based) uses: consecutive slices of a per-epoch permutation, the last partial slice
    of an epoch dropped. The same on every rank; each rank then takes its own share (`rank_share`)."""

    def __init__(self, num_records: int, per_step: int, seed: int, shuffle: bool = True):
        if per_step < 1:
            raise ValueError(f"per_step must be >= 1, got {per_step}")
        if num_records < per_step:
            raise ValueError(f"{num_records} records are fewer than the {per_step} a step needs "
                             "(train.prompts_per_step)")
        self.num_records, self.per_step, self.seed, self.shuffle = num_records, per_step, seed, shuffle
        self.steps_per_epoch = num_records // per_step

    def epoch_of(self, step: int) -> int:
        return (step - 1) // self.steps_per_epoch

    def permutation(self, epoch: int) -> list[int]:
        order = list(range(self.num_records))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def indices(self, step: int) -> list[int]:
        if step < 1:
            raise ValueError(f"steps are 1-based, got {step}")
        start = (step - 1) % self.steps_per_epoch * self.per_step
        return self.permutation(self.epoch_of(step))[start:start + self.per_step]

    def extra_indices(self, step: int, round_: int) -> list[int]:
        """Dynamic sampling's prompts for generation round `round_` (1, 2, ...) of `step`: per_step records that
        the step's own slice does not hold, consecutive slices of a permutation keyed on (seed, step) alone — so a
        resumed run draws the same ones, and the epochs' own order (what `indices` gives) never shifts. Rounds of
        one step draw distinct records until the others run out, then wrap around."""
        if round_ < 1:
            raise ValueError(f"extra rounds are 1-based, got {round_}")
        own = set(self.indices(step))
        others = [i for i in range(self.num_records) if i not in own]
        random.Random((self.seed * 1_000_003 + step) * 7_919 + 1).shuffle(others)
        if not others:  # every record is in the step's own slice: draw those again
            others = sorted(own)
        start = (round_ - 1) * self.per_step
        return [others[(start + k) % len(others)] for k in range(self.per_step)]


def rank_share(items: list, rank_: int | None = None, world: int | None = None) -> list:
    """This rank's contiguous share of a list whose length the world size divides."""
    rank_ = rank() if rank_ is None else rank_
    world = world_size() if world is None else world
    if len(items) % world:
        raise ValueError(f"{len(items)} items cannot be split evenly over {world} ranks")
    share = len(items) // world
    return items[rank_ * share:(rank_ + 1) * share]


def device_memory(device: torch.device) -> dict[str, float]:
    """Peak GPU memory since the last call (empty on CPU): what the step needed, for the metrics."""
    if device.type != "cuda":
        return {}
    peak = torch.cuda.max_memory_allocated(device) / 1e9
    torch.cuda.reset_peak_memory_stats(device)
    return {"perf/gpu_mem_peak_GB": peak}


@dataclass(frozen=True)
class TrainPlan:
    """What a run will do, said once at start-up: steps, epochs, samples, optimizer steps."""

    stage: str
    records: int
    steps_per_epoch: int
    steps: int  # train.max_steps when set (fewer: stops early; more: adds epochs), else epochs x steps_per_epoch
    prompts_per_step: int  # records per step (GRPO: prompts of the first generation round)
    samples_per_step: int  # sequences per step before filtering (GRPO: prompts x n)
    optimizer_steps_per_step: int
    note: str = ""  # stage specifics (filter, dynamic sampling)

    @property
    def epochs(self) -> float:
        return self.steps / self.steps_per_epoch

    @property
    def optimizer_steps(self) -> int:
        return self.steps * self.optimizer_steps_per_step

    def describe(self) -> str:
        per_update = self.samples_per_step / self.optimizer_steps_per_step
        return (f"[train] {self.stage}: {self.steps} steps = {self.epochs:g} epochs x {self.steps_per_epoch} steps "
                f"over {self.records} records; {self.prompts_per_step} prompts and {self.samples_per_step} samples "
                f"per step ({self.steps * self.samples_per_step} samples in all); "
                f"{self.optimizer_steps_per_step} optimizer steps per step of {per_update:g} samples each "
                f"({self.optimizer_steps} optimizer steps in all){'; ' + self.note if self.note else ''}")


def plan_run(cfg: Config, order: DataOrder, *, samples_per_step: int, optimizer_steps_per_step: int,
             note: str = "") -> TrainPlan:
    """The run's step count: epochs x steps per epoch, or train.max_steps — which stops early when smaller and
    adds epochs when larger (the data order continues into them), never silently capped."""
    steps = cfg.train.epochs * order.steps_per_epoch
    max_steps = cfg.train.max_steps
    if max_steps is not None and max_steps != steps:
        what = "stops early" if max_steps < steps else "adds epochs"
        note = f"train.max_steps={max_steps} {what} (train.epochs={cfg.train.epochs} gives {steps} steps)" + (
            f"; {note}" if note else "")
        steps = max_steps
    return TrainPlan(cfg.train.stage, order.num_records, order.steps_per_epoch, steps, order.per_step,
                     samples_per_step, optimizer_steps_per_step, note)


def build_policy(cfg: Config, model_path: Path, *, trainable: bool = True) -> nn.Module:
    """The policy: fp32 master weights sharded with FSDP2, computing in model.dtype (bf16 on GPU runs), SUM-reduced
    gradients (the losses are normalized by global counts), parts frozen by config. trainable=False: an entirely
    frozen copy in eval mode, stored in the compute dtype (the KL reference: no optimizer, so no fp32 master).

    Each rank reads only its own shards (models/sharded_loading.py): host memory per rank is ~1/world of the model.
    trust_remote_code models load whole on every rank, then shard."""
    compute = getattr(torch, cfg.model.dtype)
    stored = torch.float32 if trainable else compute
    param_dtype = None if compute == stored else compute
    options = dict(attn_implementation=cfg.model.attn_implementation, freeze_vision=cfg.model.freeze_vision,
                   freeze_projector=cfg.model.freeze_projector,
                   gradient_checkpointing=trainable and cfg.model.gradient_checkpointing)
    if cfg.model.trust_remote_code:
        model = shard_model(load_policy(model_path, dtype=stored, trust_remote_code=True, **options),
                            param_dtype=param_dtype, cpu_offload=cfg.train.cpu_offload)
    else:
        model = load_sharded_policy(model_path, dtype=stored, param_dtype=param_dtype,
                                    cpu_offload=cfg.train.cpu_offload, **options)
    if not trainable:
        model.requires_grad_(False)
        model.eval()
    return model


class StopSignal:
    """SIGTERM / SIGINT (a cluster's preemption notice, Ctrl-C) ask the run to stop after the current step with a
    checkpoint, instead of dying mid-step and losing everything since the last save. Ranks agree through one tiny
    all-reduce per step, so they all stop at the same step. A second signal is not caught again."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: int | None = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signum
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))  # a second one acts as usual

    def requested(self) -> bool:
        """Collective: whether any rank got a signal."""
        return all_reduce_dict({"stop": float(self.received is not None)}, op="max")["stop"] > 0

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


@dataclass
class Run:
    cfg: Config
    out_dir: Path
    model_path: Path
    device: torch.device
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    logger: MetricsLogger
    start_step: int  # the last completed step (0 for a fresh run)
    total_steps: int
    last_saved: int = -1
    stop_signal: StopSignal | None = None  # start_run installs one
    stopped_early: bool = False
    updates: int | None = 0  # optimizer updates applied since step 0 (count_updates; kept in checkpoints)

    @property
    def checkpoint_root(self) -> Path:
        return self.out_dir / CHECKPOINTS

    def optimizer_step(self) -> dict[str, float]:
        """Clip, step, schedule. A non-finite gradient norm skips the update (counted), so one bad batch cannot poison
        the weights."""
        norm = float(clip_grad_norm(self.model, self.cfg.train.max_grad_norm))
        finite = math.isfinite(norm)
        if finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return {"grad_norm": norm, "skipped_update": float(not finite), "lr": self.scheduler.get_last_lr()[0]}

    def save(self, step: int) -> None:
        """Collective: a complete checkpoint for `step` (model, optimizer, scheduler, RNG), atomically."""
        save_checkpoint(self.checkpoint_root, step, model=self.model, optimizer=self.optimizer,
                        scheduler=self.scheduler, extra={"step": step, "updates": self.updates},
                        keep_last=self.cfg.train.keep_last)
        self.last_saved = step

    def count_updates(self, metrics: dict) -> None:
        """Add a step's applied optimizer updates (its reduced metrics: the same number on every rank)."""
        steps = metrics.get("train/optimizer_steps", 1.0 if "train/lr" in metrics else 0.0)
        if self.updates is not None:
            self.updates += int(steps - metrics.get("train/skipped_updates", 0.0))

    def maybe_save(self, step: int) -> None:
        if step % self.cfg.train.save_every == 0 or step == self.total_steps:
            self.save(step)

    def end_step(self, step: int) -> bool:
        """Checkpoint when due; on a stop signal checkpoint now and return True (the loop then returns `stop()`)."""
        self.maybe_save(step)
        if self.stop_signal is None or not self.stop_signal.requested():
            return False
        if self.last_saved != step:
            self.save(step)
        self.stopped_early = True
        if is_main():
            print(f"[train] stopped by signal after step {step}; checkpoint saved, rerun to resume")
        return True

    def stop(self) -> Path:
        """Close the run after a stop signal: metrics flushed, no final export (the run is not finished)."""
        self.logger.close()
        self.stop_signal.restore()
        barrier()
        return self.out_dir

    def finish(self, processor=None) -> Path:
        """Final checkpoint (when the last step has none yet), the exported HF model, plots. Collective. Raises
        NoUpdateError (after the checkpoint and the metrics) when no step of the run ever updated the model
        (a rerun of such a run raises again: the count travels in the checkpoints)."""
        if self.last_saved != self.total_steps and self.start_step < self.total_steps:
            self.save(self.total_steps)
        if self.updates == 0 and self.total_steps > 0:  # None: resumed from a checkpoint that did not count them
            self.logger.close()
            if self.stop_signal is not None:
                self.stop_signal.restore()
            barrier()
            raise NoUpdateError(
                f"NO UPDATE: all {self.total_steps} steps ended without a single optimizer update, so the model is "
                f"unchanged and nothing was exported. Look at groups/kept_frac (every group filtered by "
                f"algo.filter_low/filter_high?), train/items, train/overlong_skipped and train/skipped_updates in "
                f"{self.out_dir / 'metrics.jsonl'}")
        if self.cfg.train.export_final:
            from srpo_fast.models import export_hf_safetensors

            export_hf_safetensors(self.model, self.out_dir / FINAL_MODEL, processor=processor,
                                  assets_from=self.model_path, dtype=getattr(torch, self.cfg.model.dtype))
        self.logger.close()
        if self.stop_signal is not None:
            self.stop_signal.restore()
        if is_main():
            try:
                from srpo_fast.utils.plot import plot_metrics

                plot_metrics(self.out_dir / "metrics.jsonl")
            except (SystemExit, ImportError) as exc:  # no metrics yet, or matplotlib missing
                print(f"[train] no plots: {exc}")
        barrier()
        return self.out_dir


def prewarm_logprob_kernel(cfg: Config, model: nn.Module, device: torch.device) -> list[int]:
    """Autotune the fused log-prob kernel for every micro-batch size bucket now, on a random matrix of the LM
    head's shape and compute dtype (the tuner looks at shapes only), instead of inside the first training step.
    Only on CUDA, where the Triton path runs; returns the token-count buckets it tuned."""
    head = model.get_output_embeddings() if device.type == "cuda" else None
    if head is None:
        return []
    from srpo_fast.kernels.linear_logprobs import prewarm

    weight = torch.randn(tuple(head.weight.shape), dtype=getattr(torch, cfg.model.dtype), device=device)
    buckets = prewarm(weight, range(1, cfg.train.max_tokens_per_microbatch + 1, 256))
    del weight
    return buckets


def start_run(cfg: Config, plan: TrainPlan) -> Run:
    """Say the plan, seed, write the resolved config, build policy + optimizer + schedule, resume from the newest
    checkpoint."""
    out_dir = Path(cfg.train.output_dir)
    if is_main():
        print(plan.describe(), flush=True)
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            clean_partial(out_dir / CHECKPOINTS)  # first: a killed save's partial dir may be what filled the disk
            remove_stale_exports((out_dir / FINAL_MODEL).resolve())
            save_config(cfg, out_dir / "config.yaml")
        except OSError as exc:
            raise storage_error(exc, out_dir, "the run's config") from exc
    barrier()
    seed_everything(cfg.train.seed)  # identical init and data order everywhere; sampling seeds differ per rank
    model_path = resolve_model_path(cfg)
    device = default_device()
    if is_main():  # before minutes of loading: say which phase will not fit the GPU (docs/gpu.md)
        from .memory import plan_for_run, warn_if_unfit

        warn_if_unfit(plan_for_run(cfg, model_path, world_size()))
    model = build_policy(cfg, model_path)
    prewarm_logprob_kernel(cfg, model, device)
    optimizer = build_optimizer(model, cfg.train.lr, betas=tuple(cfg.train.adam_betas), eps=cfg.train.adam_eps,
                                weight_decay=cfg.train.weight_decay, impl=cfg.train.offload_optimizer)
    scheduler = build_lr_scheduler(optimizer, total_steps=max(1, plan.optimizer_steps),
                                   warmup_ratio=cfg.train.warmup_ratio, schedule=cfg.train.lr_schedule,
                                   min_lr_ratio=cfg.train.min_lr_ratio)
    start, updates = 0, 0
    checkpoint = latest_checkpoint(out_dir / CHECKPOINTS) if cfg.train.resume else None
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, model=model, optimizer=optimizer, scheduler=scheduler)
        start, updates = int(state["step"]), state["extra"].get("updates")
        if is_main():
            print(f"[train] resumed from {checkpoint} (step {start})")
    elif latest_checkpoint(out_dir / CHECKPOINTS) is not None:
        raise FileExistsError(f"{out_dir} already holds checkpoints and train.resume=false: set train.resume=true "
                              "to continue that run, or pick a new train.output_dir")
    logger = MetricsLogger(out_dir, tensorboard=cfg.log.tensorboard, wandb_project=cfg.log.wandb_project,
                           enabled=is_main() and cfg.log.jsonl,
                           resume_from_step=start if checkpoint is not None else -1,  # no checkpoint: all redone
                           config=config_to_dict(cfg))
    return Run(cfg=cfg, out_dir=out_dir, model_path=model_path, device=device, model=model, optimizer=optimizer,
               scheduler=scheduler, logger=logger, start_step=start, total_steps=plan.steps,
               last_saved=start if checkpoint is not None else -1, stop_signal=StopSignal(), updates=updates)

