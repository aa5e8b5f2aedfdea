"""torchrun worker for tests/models/test_{fsdp,weights}.py and tests/utils/test_checkpoint.py: one launch, every multi-rank check.

    python -m torch.distributed.run --nproc_per_node=2 tests/dist/fsdp_worker.py --kit KIT_VL_DIR --out DIR

Rank 0 runs a single-process reference of the same training (no FSDP, the whole global batch); both ranks run it
under FSDP2 with uneven token counts per rank. Raw numbers (differences, norms, names) go to DIR/result.json; the
pytest side asserts on them, so a failing check shows its measured value.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors import safe_open  # noqa: E402
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

from srpo_fast.models.fsdp import (build_lr_scheduler, build_optimizer, clip_grad_norm, shard_model,  # noqa: E402
                                   vision_tower)
from srpo_fast.models.processor import load_processor  # noqa: E402
from srpo_fast.models.weights import checkpoint_names, export_hf_safetensors, iter_full_weights  # noqa: E402
from srpo_fast.utils.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint  # noqa: E402
from srpo_fast.utils.distributed import all_reduce_dict, all_reduce_sum, cleanup, init_distributed  # noqa: E402
from srpo_fast.utils.distributed import seed_everything  # noqa: E402

LR, MAX_NORM, STEPS, SAVE_AT = 1e-3, 1.0, 4, 2
# (image width, height, extra words) per sequence; per rank: two micro-batches, deliberately unequal in tokens
SEQS = [(56, 56, 1), (112, 84, 5), (84, 112, 2), (112, 112, 7), (56, 112, 0)]
RANK_MICRO_BATCHES = [[[0, 1], [2]], [[3], [4]]]


def build_micro_batches(kit: Path) -> list[dict]:
    """All micro-batches (rank 0's first), each a right-padded batch with images and its loss targets/mask."""
    processor = load_processor(kit)
    texts, images = [], []
    for i, (w, h, n_words) in enumerate(SEQS):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "count the shapes"}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        texts.append(prompt + " ".join(["the answer is", *[str(7 * i + k) for k in range(n_words)]]))
        images.append(Image.new("RGB", (w, h), (30 * i, 200 - 20 * i, 90)))
    out = []
    for rank_mbs in RANK_MICRO_BATCHES:
        for seq_ids in rank_mbs:
            batch = processor(text=[texts[i] for i in seq_ids], images=[images[i] for i in seq_ids],
                              padding=True, return_tensors="pt")
            mask = batch["attention_mask"].bool()
            batch = dict(batch)
            batch["targets"] = batch["input_ids"][:, 1:]
            batch["loss_mask"] = mask[:, 1:] & mask[:, :-1]
            out.append(batch)
    return out


def token_loss_sum(model, mb: dict) -> torch.Tensor:
    inputs = {k: mb[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")
              if k in mb}
    logits = model(**inputs, use_cache=False).logits[:, :-1].float()
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), mb["targets"].reshape(-1), reduction="none")
    return (ce * mb["loss_mask"].reshape(-1)).sum()


def load_vl(kit: Path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(kit, local_files_only=True, attn_implementation="sdpa")
    vision_tower(model).requires_grad_(False)
    model.train()
    return model


def make_training(model, steps_total: int):
    optimizer = build_optimizer(model, LR, weight_decay=0.05)
    scheduler = build_lr_scheduler(optimizer, total_steps=steps_total, warmup_ratio=0.25, schedule="cosine",
                                   min_lr_ratio=0.1)
    return optimizer, scheduler


def train_step(model, optimizer, scheduler, micro_batches, global_tokens, sharded=True,
               grads_out: dict | None = None) -> tuple[float, float]:
    """One optimizer step over this process's micro-batches; returns (global token-mean loss, grad norm).
    The unsharded reference (rank 0 alone) must not enter a collective. grads_out receives the full gradients."""
    local = torch.zeros((), dtype=torch.float64)
    for mb in micro_batches:
        loss = token_loss_sum(model, mb) / global_tokens
        loss.backward()
        local += loss.detach().double()
    if grads_out is not None:
        for name, p in model.named_parameters():  # same order on every rank: full_tensor() is a collective
            if p.grad is not None:
                grads_out[name] = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad.detach().clone()
    norm = clip_grad_norm(model, MAX_NORM)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(all_reduce_sum(local) if sharded else local), float(norm)


def log(*parts) -> None:
    if os.environ.get("SRPO_WORKER_VERBOSE"):
        print(f"[rank {os.environ.get('RANK')} {time.strftime('%X')}]", *parts, file=sys.stderr, flush=True)


def max_abs_diff(a: dict, b: dict) -> float:
    if set(a) != set(b):
        raise KeyError(f"key sets differ: {sorted(set(a) ^ set(b))[:5]}")
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def full_sd(model) -> dict:
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def rng_probe() -> list[float]:
    return [random.random(), float(np.random.rand()), *torch.rand(2).tolist()]


def main_vl(args, info, res: dict, timings: dict) -> None:
    kit = Path(args.kit)
    out = Path(args.out)
    mbs = build_micro_batches(kit)
    global_tokens = sum(int(mb["loss_mask"].sum()) for mb in mbs)
    first = sum(len(r) for r in RANK_MICRO_BATCHES[: info.rank])
    mine = mbs[first:first + len(RANK_MICRO_BATCHES[info.rank])]
    my_tokens = torch.tensor(float(sum(int(mb["loss_mask"].sum()) for mb in mine)))
    res["tokens_per_rank"] = [int(x) for x in _gather_scalar(my_tokens)]
    res["global_tokens"] = global_tokens  # known here because every rank built every micro-batch
    res["global_tokens_all_reduced"] = int(all_reduce_sum(my_tokens).item())  # what a trainer has to do

    log('reference')
    # single-process reference on rank 0: all micro-batches, same loss scaling, no FSDP
    if info.rank == 0:
        t0 = time.time()
        ref = load_vl(kit)
        opt, sched = make_training(ref, STEPS)
        ref_grads: dict = {}
        ref_out = [train_step(ref, opt, sched, mbs, global_tokens, sharded=False,
                              grads_out=ref_grads if step == 0 else None) for step in range(STEPS)]
        res["ref_losses"] = [x[0] for x in ref_out]
        res["ref_norms"] = [x[1] for x in ref_out]
        ref_sd = {k: v.detach().clone() for k, v in ref.state_dict().items()}
        timings["reference"] = time.time() - t0

    log('fsdp training')
    # FSDP2, uninterrupted, checkpoint after SAVE_AT steps
    t0 = time.time()
    model = shard_model(load_vl(kit))
    opt, sched = make_training(model, STEPS)
    losses, norms = [], []
    ckpt_root = out / "ckpt"
    for step in range(1, STEPS + 1):
        grads: dict = {}
        loss, norm = train_step(model, opt, sched, mine, res["global_tokens_all_reduced"],
                                grads_out=grads if step == 1 else None)
        if step == 1 and info.rank == 0:
            res["grad_diff_vs_ref"] = max_abs_diff(grads, ref_grads)
            res["grad_max_abs"] = max(g.abs().max().item() for g in ref_grads.values())
            res["grad_names_equal"] = sorted(grads) == sorted(ref_grads)
        losses.append(loss)
        norms.append(norm)
        if step == SAVE_AT:
            t1 = time.time()
            save_checkpoint(ckpt_root, step, model=model, optimizer=opt, scheduler=sched,
                            extra={"data_pos": 100 + info.rank, "rank": info.rank})
            timings["save_checkpoint"] = time.time() - t1
            after_save_rng = rng_probe()
    timings["fsdp_train"] = time.time() - t0
    res["fsdp_losses"], res["fsdp_norms"] = losses, norms
    res["norms_equal_on_ranks"] = all_reduce_dict({"n": norms[0]}, op="max")["n"] == \
        -all_reduce_dict({"n": -norms[0]}, op="max")["n"]
    final = full_sd(model)
    if info.rank == 0:
        res["param_diff_vs_ref"] = max_abs_diff(final, ref_sd)
        res["param_diff_top"] = sorted(((final[k] - ref_sd[k]).abs().max().item(), k) for k in final)[-3:]
        res["frozen_vision_unchanged"] = max(
            (final[k] - v).abs().max().item() for k, v in load_vl(kit).state_dict().items() if "visual" in k) == 0.0
    final_lr = sched.get_last_lr()

    log('weights out')
    # weights out: iterator vs full state dict, names vs the kit's safetensors, bucket limit
    t0 = time.time()
    names = checkpoint_names(model)
    bucket_bytes = 40_000
    buckets = list(iter_full_weights(model, bucket_bytes=bucket_bytes))
    timings["iter_full_weights"] = time.time() - t0
    trainable = [n for bucket in iter_full_weights(model, bucket_bytes=1 << 30, only_trainable=True) for n, _ in bucket]
    with safe_open(kit / "model.safetensors", "pt") as f:
        kit_keys = set(f.keys())
    pairs = [p for bucket in buckets for p in bucket]
    res["iter_names_equal_kit_file"] = sorted(n for n, _ in pairs) == sorted(kit_keys)
    res["iter_no_duplicate_names"] = len({n for n, _ in pairs}) == len(pairs)
    res["bucket_sizes"] = [sum(t.numel() * t.element_size() for _, t in b) for b in buckets]
    res["bucket_counts"] = [len(b) for b in buckets]
    res["bucket_bytes"] = bucket_bytes
    res["trainable_names_ok"] = (set(trainable) == {names[k] for k, p in model.named_parameters() if p.requires_grad}
                                 and not any(n.startswith("visual.") for n in trainable) and len(trainable) > 0)
    if info.rank == 0:
        res["iter_values_diff"] = max_abs_diff({n: t for n, t in pairs}, {names[k]: v for k, v in final.items()})

    log('export')
    # export → transformers reload gives identical logits to a plain model holding the gathered weights
    t0 = time.time()
    export_dir = export_hf_safetensors(model, out / "export", assets_from=kit)
    timings["export"] = time.time() - t0
    if info.rank == 0:
        from safetensors.torch import load_file
        from transformers import Qwen2_5_VLForConditionalGeneration

        saved = load_file(export_dir / "model.safetensors")
        res["export_keys_equal_kit_file"] = set(saved) == kit_keys
        res["export_values_diff"] = max_abs_diff(saved, {n: t for n, t in pairs})
        reloaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(export_dir, local_files_only=True,
                                                                      attn_implementation="sdpa").eval()
        plain = load_vl(kit).eval()
        plain.load_state_dict(final, strict=True)
        inputs = {k: v for k, v in mbs[0].items() if k not in ("targets", "loss_mask")}
        with torch.no_grad():
            a, b = reloaded(**inputs).logits, plain(**inputs).logits
        res["export_logits_equal"] = bool(torch.equal(a, b))
        res["export_logits_maxdiff"] = (a - b).abs().max().item()
        res["export_files"] = sorted(os.listdir(export_dir))

    log('resume')
    # resume: fresh model + optimizer + scheduler from the step-SAVE_AT checkpoint, run the remaining steps
    t0 = time.time()
    seed_everything(999, rank_offset=info.rank)  # scramble RNG: the checkpoint must restore it
    resumed = shard_model(load_vl(kit))
    opt2, sched2 = make_training(resumed, STEPS)
    latest = latest_checkpoint(ckpt_root)
    state = load_checkpoint(latest, model=resumed, optimizer=opt2, scheduler=sched2)
    timings["load_checkpoint"] = time.time() - t0
    res["resume_rng_equal"] = all_reduce_dict({"ok": float(rng_probe() == after_save_rng)}, op="min")["ok"] == 1.0
    res["resume_step"] = state["step"]
    res["resume_extra_ok"] = all_reduce_dict(
        {"ok": float(state["extra"] == {"data_pos": 100 + info.rank, "rank": info.rank})}, op="min")["ok"] == 1.0
    res["resume_latest_name"] = latest.name
    resumed_losses = [train_step(resumed, opt2, sched2, mine, global_tokens)[0] for _ in range(STEPS - SAVE_AT)]
    res["resumed_losses"] = resumed_losses
    res["resume_losses_exact"] = resumed_losses == losses[SAVE_AT:]
    res["resume_lr_equal"] = sched2.get_last_lr() == final_lr
    final2 = full_sd(resumed)
    if info.rank == 0:
        res["resume_param_diff"] = max_abs_diff(final2, final)


def _gather_scalar(x: torch.Tensor) -> list[float]:
    import torch.distributed as dist

    parts = [torch.zeros_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x)
    return [float(p) for p in parts]


def text_ids(n_rows: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(10, 1000, (1, int(torch.randint(6, 20, (1,), generator=gen))), generator=gen)
            for _ in range(n_rows)]


def padded_steps(model, opt, my_rows: list[torch.Tensor], n_forwards: int, total: int, sharded: bool,
                 steps: int = 2):
    """Plain text training steps. Every rank must run the same number of forwards under FSDP, so a rank with fewer
    rows repeats one with loss weight 0 (it adds collectives, not gradient)."""
    out = []
    for _ in range(steps):
        loss_sum = torch.zeros((), dtype=torch.float64)
        for i in range(n_forwards):
            ids = my_rows[i % len(my_rows)]
            logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
            weight = 1.0 if i < len(my_rows) else 0.0
            loss = weight * F.cross_entropy(logits, ids[0, 1:], reduction="sum") / total
            loss.backward()
            loss_sum += loss.detach().double()
        norm = clip_grad_norm(model, MAX_NORM)
        opt.step()
        opt.zero_grad(set_to_none=True)
        out.append((float(all_reduce_sum(loss_sum) if sharded else loss_sum), float(norm)))
    return out


def small_model_check(name: str, build, rows: list[torch.Tensor], info, res: dict, out_dir: Path,
                      **shard_options) -> None:
    """Two steps, FSDP2 (with shard_options) vs one process on `build()`; rows split 3 / 2 over the two ranks."""
    total = sum(r.shape[1] - 1 for r in rows)
    split = [rows[:3], rows[3:]] if info.world_size == 2 else [rows]
    out = {}
    if info.rank == 0:
        ref = build()
        out["ref"] = padded_steps(ref, build_optimizer(ref, LR), rows, len(rows), total, sharded=False)
    model = shard_model(build(), **shard_options)
    out["fsdp"] = padded_steps(model, build_optimizer(model, LR), split[info.rank], max(map(len, split)), total,
                              sharded=True)
    final = full_sd(model)
    export_dir = export_hf_safetensors(model, out_dir / f"export_{name}")
    if info.rank == 0:
        out["param_diff"] = max_abs_diff(final, {k: v.detach() for k, v in ref.state_dict().items()})
        with safe_open(export_dir / "model.safetensors", "pt") as f:
            out["export_keys"] = sorted(f.keys())
        out["state_dict_keys"] = sorted(ref.state_dict().keys())
    res[name] = out


def build_qwen2_vl():
    """A tiny Qwen2-VL (older vision tower layout), random init, seeded the same on every rank."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    config = Qwen2VLConfig(
        text_config=dict(vocab_size=1152, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]}),
        vision_config=dict(depth=2, embed_dim=64, hidden_size=128, num_heads=2, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=1010, video_token_id=1011, vision_start_token_id=1012, vision_end_token_id=1013)
    torch.manual_seed(5)
    model = Qwen2VLForConditionalGeneration(config)
    vision_tower(model).requires_grad_(False)
    return model.train()


def build_qwen2_tied(kit_text: Path):
    from transformers import AutoConfig, Qwen2ForCausalLM

    config = AutoConfig.from_pretrained(kit_text, local_files_only=True)
    config.tie_word_embeddings = True
    torch.manual_seed(6)
    return Qwen2ForCausalLM(config).train()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kit", required=True, help="tiny Qwen2.5-VL dir")
    parser.add_argument("--kit-text", required=True, help="tiny Qwen2 dir")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    info = init_distributed()
    seed_everything(1234, rank_offset=info.rank)
    res: dict = {"world_size": info.world_size}
    timings: dict = {}
    main_vl(args, info, res, timings)
    t0 = time.time()
    out = Path(args.out)
    small_model_check("qwen2_vl", build_qwen2_vl, text_ids(5, 1), info, res, out)
    small_model_check("qwen2_tied_bf16_offload", lambda: build_qwen2_tied(Path(args.kit_text)), text_ids(5, 2),
                      info, res, out, param_dtype=torch.bfloat16, cpu_offload=True, reshard_after_forward=False)
    timings["small_models"] = time.time() - t0
    res["timings"] = {k: round(v, 3) for k, v in timings.items()}
    if info.rank == 0:
        (Path(args.out) / "result.json").write_text(json.dumps(res, indent=1))
    cleanup()


if __name__ == "__main__":
    sys.exit(main())
