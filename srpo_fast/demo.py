"""End-to-end SRPO loop on one process with the parts that exist today: `python -m srpo_fast.demo --config FILE`.

rollout (HF `generate`, n samples per prompt) → reflection-aware reward → group advantages + accuracy filter →
log-probs from hidden states with `linear_token_logprobs` (no [T, V] logits) → `grpo_loss` → AdamW → metrics.
It runs the real components on the tiny offline model and the synthetic task; the distributed trainer
(`torchrun -m srpo_fast.train`: vLLM rollouts, FSDP2, packing, checkpoints) builds on the same pieces.
"""
from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch
from tqdm import tqdm

from srpo_fast.config import Config, load_config, save_config
from srpo_fast.data.prompts import build_messages
from srpo_fast.data.records import load_records
from srpo_fast.data.synthetic import make_dataset
from srpo_fast.kernels import grpo_loss, linear_token_logprobs
from srpo_fast.models.processor import load_processor
from srpo_fast.reward import score_batch
from srpo_fast.reward.advantages import group_advantages
from srpo_fast.utils.metrics import MetricsLogger

BLOCKED_TOKENS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")


def resolve_model_path(cfg: Config) -> Path:
    if cfg.model.path != "tiny":
        return Path(cfg.model.path)
    from srpo_fast.tiny import ensure_tiny_kit

    return ensure_tiny_kit(Path(cfg.train.output_dir) / "tiny_kit", seed=cfg.train.seed)["vl"]


def load_dataset(cfg: Config) -> list[dict]:
    if not cfg.data.train_files:
        return make_dataset(cfg.data.synthetic_size, seed=cfg.train.seed, difficulty=cfg.data.synthetic_difficulty)
    records, report = load_records(cfg.data.train_files)
    if report.skipped:
        print(f"[data] skipped {report.skipped} bad records: {report.reasons}")
    if not records:
        raise SystemExit(f"no usable records in {cfg.data.train_files}")
    return records


def encode_prompt(processor, record: dict, template: str) -> dict:
    text = processor.apply_chat_template(build_messages(record, template), add_generation_prompt=True, tokenize=False)
    return processor(text=[text], images=record["images"] or None, return_tensors="pt")


@torch.no_grad()
def sample_group(model, processor, inputs: dict, cfg: Config, suppress: list[int]) -> list[list[int]]:
    """n response id lists for one prompt, each cut after its first end-of-turn token."""
    eos = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    out = model.generate(**inputs, do_sample=True, temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                         top_k=None if cfg.rollout.top_k < 0 else cfg.rollout.top_k,
                         max_new_tokens=cfg.rollout.max_tokens, num_return_sequences=cfg.rollout.n,
                         suppress_tokens=suppress, eos_token_id=eos, pad_token_id=eos)
    responses = []
    for row in out[:, inputs["input_ids"].shape[1]:].tolist():
        responses.append(row[:row.index(eos) + 1] if eos in row else row)
    return responses


def response_logprobs(model, inputs: dict, response: list[int], temperature: float) -> torch.Tensor:
    """Log-probs of the response tokens from the final hidden states, through the fused linear kernel."""
    prompt_ids = inputs["input_ids"][0]
    ids = torch.cat([prompt_ids, torch.tensor(response, dtype=prompt_ids.dtype)])[None]
    mm_types = torch.cat([inputs["mm_token_type_ids"][0], torch.zeros(len(response), dtype=torch.long)])[None]
    hidden = model.model(input_ids=ids, pixel_values=inputs.get("pixel_values"),
                         image_grid_thw=inputs.get("image_grid_thw"), mm_token_type_ids=mm_types,
                         use_cache=False).last_hidden_state[0]
    start = prompt_ids.numel()
    positions = hidden[start - 1:start - 1 + len(response)]  # token t is predicted from position t-1
    return linear_token_logprobs(positions, model.lm_head.weight, ids[0, start:], temperature=temperature,
                                 return_entropy=False)


def run(cfg: Config) -> Path:
    from transformers import Qwen2_5_VLForConditionalGeneration

    if cfg.rollout.engine != "hf":
        raise SystemExit("the demo rolls out with HF generate (rollout.engine=hf); vLLM rollouts run in the trainer")
    out_dir = Path(cfg.train.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir / "config.yaml")
    random.seed(cfg.train.seed)
    torch.manual_seed(cfg.train.seed)

    model_path = resolve_model_path(cfg)
    processor = load_processor(model_path, min_pixels=cfg.model.min_pixels, max_pixels=cfg.model.max_pixels)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_path, local_files_only=True,
                                                               dtype=getattr(torch, cfg.model.dtype))
    if cfg.model.freeze_vision:
        model.model.visual.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.train.lr,
                                  weight_decay=cfg.train.weight_decay)
    tokenizer = processor.tokenizer
    suppress = [tokenizer.convert_tokens_to_ids(t) for t in BLOCKED_TOKENS]
    suppress += list(range(len(tokenizer), model.config.text_config.vocab_size))  # padded rows decode to ''

    dataset = load_dataset(cfg)
    template = "r1" if cfg.reward.resolved_preset == "r1" else "srpo"
    order = list(range(len(dataset)))
    steps = cfg.train.max_steps or cfg.train.epochs * len(dataset) // cfg.train.prompts_per_step
    count_tokens = lambda text: len(tokenizer.encode(text, add_special_tokens=False))  # noqa: E731
    with MetricsLogger(out_dir, tensorboard=cfg.log.tensorboard, config=vars(cfg)) as logger:
        for step in tqdm(range(1, steps + 1), desc="srpo demo", disable=not cfg.log.progress):
            t0 = time.perf_counter()
            if cfg.data.shuffle and (step - 1) * cfg.train.prompts_per_step % len(dataset) == 0:
                random.shuffle(order)
            batch = [dataset[order[((step - 1) * cfg.train.prompts_per_step + i) % len(dataset)]]
                     for i in range(cfg.train.prompts_per_step)]
            model.eval()
            encoded = [encode_prompt(processor, record, template) for record in batch]
            groups = [sample_group(model, processor, inputs, cfg, suppress) for inputs in encoded]
            t_rollout = time.perf_counter() - t0

            responses = [ids for group in groups for ids in group]
            texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
            answers = [record["answer"] for record in batch for _ in range(cfg.rollout.n)]
            reward = score_batch(texts, answers, config=cfg.reward, count_tokens=count_tokens,
                                 response_lengths=[len(ids) for ids in responses])
            adv = group_advantages(reward.total, cfg.rollout.n, method=cfg.algo.adv_estimator,
                                   accuracy=reward.first_correct,
                                   accuracy_range=(cfg.algo.filter_low, cfg.algo.filter_high)
                                   if cfg.algo.filter_groups else None)
            t_reward = time.perf_counter() - t0 - t_rollout

            model.train()
            kept = [i for i in range(len(responses)) if adv.kept[i]]
            loss_metrics = {}
            if kept:
                logps = [response_logprobs(model, encoded[i // cfg.rollout.n], responses[i], cfg.rollout.temperature)
                         for i in kept]
                logp = torch.cat(logps)
                lengths = torch.tensor([len(responses[i]) for i in kept])
                cu_seqlens = torch.cat([torch.zeros(1, dtype=torch.int32), lengths.cumsum(0).to(torch.int32)])
                loss, loss_metrics = grpo_loss(
                    logp, logp.detach(), adv.advantages[kept], torch.ones_like(logp), cu_seqlens,
                    clip_low=cfg.algo.clip_low, clip_high=cfg.algo.clip_high, dual_clip=cfg.algo.dual_clip,
                    aggregation=cfg.algo.aggregation, is_level=cfg.algo.is_level)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm)
                optimizer.step()
                loss_metrics = {"loss/pg": loss.detach(), "loss/grad_norm": grad_norm,
                                **{f"loss/{k}": v for k, v in loss_metrics.items()}}
            has_ref = reward.has_reflection
            first, second = reward.first_correct, reward.second_correct
            logger.log(step, {
                "reward/total": reward.total.mean(), "reward/format": reward.format.mean(),
                "reward/accuracy": reward.accuracy.mean(), "reward/effectiveness": reward.effectiveness.mean(),
                "reward/length": reward.length.mean(), "reward/timeouts": reward.timeouts,
                "reflect/rate": has_ref.float().mean(),
                "reflect/fix_rate": (has_ref & ~first & second).float().mean(),
                "reflect/break_rate": (has_ref & first & ~second).float().mean(),
                "acc/first": first.float().mean(), "acc/final": second.float().mean(),
                "data/response_len": float(sum(map(len, responses)) / len(responses)),
                "data/kept_groups": adv.group_kept.float().sum(), **loss_metrics,
                "timing/rollout_s": t_rollout, "timing/reward_s": t_reward,
                "timing/step_s": time.perf_counter() - t0})
    final = out_dir / "final_model"
    tmp = out_dir / "final_model.tmp"
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    if final.exists():
        import shutil

        shutil.rmtree(final)
    tmp.rename(final)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m srpo_fast.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=None, help="YAML config (default: built-in defaults)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. rollout.n=4")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    out_dir = run(cfg)
    print(f"[demo] done: {out_dir / 'metrics.jsonl'}")
    try:
        from srpo_fast.utils.plot import plot_metrics

        print("[demo] plots:", *map(str, plot_metrics(out_dir / "metrics.jsonl")))
    except SystemExit as exc:
        print(f"[demo] no plots: {exc}")


if __name__ == "__main__":
    main()
