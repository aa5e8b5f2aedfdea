"""Stage 1: supervised fine-tuning on the reflection cold-start data (docs/method.md, stage 1).

Each record (EasyR1 schema plus `response`, as `python -m srpo_fast.distill` writes it) is trained as
prompt = the srpo chat template over `problem` and its images, target = `response` + `<|im_end|>`. The loss is
−log π(a1, reflection, a2 | q), averaged over every response token of the step (all ranks), prompt tokens
excluded. Packing, rank balancing, checkpoints and resume are the same as stage 2's (batches.py, run.py).
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from srpo_fast.config import Config, ConfigError
from srpo_fast.data.packing import MRopeIndexer, Sample
from srpo_fast.data.prompts import build_messages
from srpo_fast.data.records import open_images
from srpo_fast.models import is_vision_language, packed_token_logprobs
from srpo_fast.models.processor import load_processor
from srpo_fast.rollout import InvalidRequestError, RolloutRequest
from srpo_fast.rollout.encoding import PromptBuilder
from srpo_fast.utils.distributed import all_reduce_dict, is_main, world_size

from .batches import StepItems, TrainItem, plan_mini_batch, share_items
from .run import DataOrder, device_memory, load_train_records, plan_run, rank_share, start_run

END_OF_TURN = "<|im_end|>"


class SFTEncoder:
    """Record → packing Sample, with prompt ids and image tensors built exactly as the rollout engines build them."""

    def __init__(self, processor, *, template: str, max_prompt_tokens: int, max_images: int = 1,
                 max_response_tokens: int | None = None):
        self.builder = PromptBuilder(processor, max_images=max_images)
        self.tokenizer = self.builder.tokenizer
        self.template = template
        self.max_prompt_tokens = max_prompt_tokens
        self.max_response_tokens = max_response_tokens
        self.end_of_turn = self.tokenizer.convert_tokens_to_ids(END_OF_TURN)

    def encode(self, index: int, record: dict) -> Sample:
        """Raises ValueError (InvalidRequestError included) for a record that cannot be trained on."""
        response = record.get("response")
        if not isinstance(response, str) or not response.strip():
            raise ValueError("record has no 'response' text (the SFT target); build SFT data with srpo_fast.distill")
        prepared = self.builder.prepare(index, RolloutRequest(messages=build_messages(record, self.template),
                                                              images=record.get("images") or ()))
        if len(prepared.prompt_ids) > self.max_prompt_tokens:
            raise ValueError(f"prompt has {len(prepared.prompt_ids)} tokens, over data.max_prompt_tokens="
                             f"{self.max_prompt_tokens}")
        response_ids = self.tokenizer(response, add_special_tokens=False)["input_ids"] + [self.end_of_turn]
        if self.max_response_tokens is not None and len(response_ids) > self.max_response_tokens:
            raise ValueError(f"response has {len(response_ids)} tokens, over data.max_response_tokens="
                             f"{self.max_response_tokens}")
        images = prepared.image_inputs
        return Sample(prompt_ids=prepared.prompt_ids, response_ids=response_ids,
                      pixel_values=None if images is None else images.pixel_values,
                      image_grid_thw=None if images is None else images.image_grid_thw,
                      mm_token_type_ids=None if images is None else images.mm_token_type_ids)


def encode_share(encoder: SFTEncoder, records: Sequence[dict], first_index: int) -> tuple[list[TrainItem], dict]:
    """This rank's items; bad records are counted by reason, never silently dropped."""
    items, skipped = [], {}
    for offset, record in enumerate(records):
        try:
            items.append(TrainItem(encoder.encode(first_index + offset, open_images(record)), group=offset))
        except (ValueError, InvalidRequestError) as exc:  # RecordError (undecodable image) is a ValueError
            reason = str(exc).split(":")[0][:80]
            skipped[reason] = skipped.get(reason, 0) + 1
            if is_main():
                print(f"[sft] skipped record: {exc}")
    return items, skipped


def train_sft(cfg: Config) -> Path:
    if cfg.train.prompts_per_step % world_size():
        raise ConfigError(f"train.prompts_per_step={cfg.train.prompts_per_step} must be divisible by the "
                          f"{world_size()} ranks")
    if not cfg.data.train_files:
        raise ConfigError("train.stage=sft needs data.train_files: jsonl/parquet records with a 'response' field "
                          "(python -m srpo_fast.distill builds them)")
    records = load_train_records(cfg)
    order = DataOrder(len(records), cfg.train.prompts_per_step, cfg.train.seed, cfg.data.shuffle)
    plan = plan_run(cfg, order, samples_per_step=cfg.train.prompts_per_step, optimizer_steps_per_step=1)
    run = start_run(cfg, plan)
    total = plan.steps
    processor = load_processor(run.model_path, min_pixels=cfg.model.min_pixels, max_pixels=cfg.model.max_pixels)
    encoder = SFTEncoder(processor, template="srpo", max_prompt_tokens=cfg.data.max_prompt_tokens,
                         max_images=cfg.data.max_images_per_prompt,
                         max_response_tokens=cfg.data.max_response_tokens)
    rope_index = MRopeIndexer(run.model) if is_vision_language(run.model) else None
    progress = tqdm(total=total, initial=run.start_step, desc="srpo sft", unit="step",
                    disable=not (cfg.log.progress and is_main()))
    for step in range(run.start_step + 1, total + 1):
        start = time.perf_counter()
        indices = rank_share(order.indices(step))
        local, skipped = encode_share(encoder, [records[i] for i in indices], indices[0] if indices else 0)
        items = share_items(local)
        run.model.train()
        metrics = {"data/skipped_records": all_reduce_dict({"n": float(sum(skipped.values()))}, op="sum")["n"]}
        if len(items):
            metrics.update(sft_update(cfg, run, items, rope_index))
        step_s = time.perf_counter() - start
        metrics.update({"timing/step_s": step_s, "data/epoch": float(order.epoch_of(step)),
                        "perf/tokens_per_s": metrics.get("train/tokens", 0.0) / step_s})
        metrics.update(device_memory(run.device))
        run.count_updates(metrics)
        run.logger.log(step, metrics)
        progress.update(1)
        if "loss/nll" in metrics:
            progress.set_postfix(nll=f"{metrics['loss/nll']:.3f}")
        if run.end_step(step):
            break
    progress.close()
    return run.stop() if run.stopped_early else run.finish(processor)


def sft_update(cfg: Config, run, items: StepItems, rope_index) -> dict[str, float]:
    """One optimizer step: mean NLL over every response token of the step (all ranks). Collective."""
    mini = plan_mini_batch(items, range(len(items)), max_tokens=cfg.train.max_tokens_per_microbatch, device=run.device,
                           rope_index=rope_index, attention_cost=cfg.train.attention_cost,
                           on_overlong=cfg.train.on_overlong)
    normalizer = max(mini.response_tokens, 1.0)  # global: the same on every rank
    nll_sum = torch.zeros((), dtype=torch.float64, device=run.device)
    run.optimizer.zero_grad(set_to_none=True)
    for micro in mini.micro_batches:
        logp = packed_token_logprobs(run.model, micro.batch, temperature=1.0)
        nll = -(logp * micro.batch.loss_mask).sum()
        (nll / normalizer).backward()
        nll_sum += nll.detach().double()
    step = run.optimizer_step()
    return {"loss/nll": all_reduce_dict({"nll": nll_sum}, op="sum")["nll"] / normalizer,
            "loss/grad_norm": step["grad_norm"], "train/lr": step["lr"],
            "train/skipped_updates": step["skipped_update"], "train/tokens": mini.response_tokens,
            "train/sequences": float(mini.sequences), "train/overlong_skipped": float(mini.skipped),
            "train/microbatches": float(len(mini.micro_batches))}
