"""HF `generate` fallback with the vLLM engine's protocol: for machines without vLLM, and as a reference.

Batched, left-padded generation over the same prepared prompts (`encoding.py`), so prompt ids and image tensors are
identical to the vLLM engine's. Log-probs follow the same convention: "processed" from the generation scores (after
temperature, top-k/top-p and the blocked-token processors — greedy: T = 1), "raw" from the unprocessed logits.
Responses are cut as vLLM cuts them: after the first EOS (kept), after the token that completes a stop string, or at
max_model_len (a stop string ending in a partial UTF-8 character: vLLM's incremental detokenizer sees it one token
late and keeps that token). Seeded calls are reproducible for the same batch; they do not replay vLLM's random streams.
"""
from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from srpo_fast.models.attention import ATTN_NAME, attn_implementation_for
from srpo_fast.models.processor import load_processor

from .guards import flag_response, request_seed, tokenizer_size, vision_token_ids
from .encoding import PreparedPrompt, PromptBuilder, prepare_batch
from .types import (OverlongPolicy, RolloutEngineConfig, RolloutRequest, Rollouts, RolloutSample, SamplingConfig,
                    WeightsInput, WeightSyncStats, logprobs_temperature)
from .weights import copy_into_module, iter_weight_pairs, parameter_lookup

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def load_hf_model(config: RolloutEngineConfig, with_images: bool, device: torch.device) -> torch.nn.Module:
    """The generation model; its language model runs our attention (`srpo_varlen`), whose padded-batch path keeps
    grouped-query attention inside SDPA on CPU instead of copying K/V once per query-head group every step."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    if config.dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {config.dtype!r}")
    cls = AutoModelForImageTextToText if with_images else AutoModelForCausalLM
    model_type = AutoConfig.from_pretrained(config.model, local_files_only=True).model_type
    model = cls.from_pretrained(config.model, dtype=_DTYPES[config.dtype], local_files_only=True,
                                attn_implementation=attn_implementation_for(model_type, ATTN_NAME))
    return model.to(device).eval()


class BlockTokens:
    """Logits processor: -inf on a fixed set of ids, through an index built once (transformers' bad_words_ids
    machinery handles multi-token sequences, which single blocked ids do not need)."""

    def __init__(self, ids: Sequence[int], device: torch.device):
        self.ids = torch.tensor(sorted(set(ids)), dtype=torch.long, device=device)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        # out of place: generate keeps this very tensor as the step's raw logits (output_logits)
        return scores.index_fill(1, self.ids[self.ids < scores.shape[1]], float("-inf"))


class HFEngine:
    """Rollouts from a transformers model. `model` may be passed in (e.g. an unwrapped copy of the policy)."""

    def __init__(self, config: RolloutEngineConfig, model: torch.nn.Module | None = None):
        self.config = config
        self.processor = load_processor(config.model, min_pixels=config.min_pixels, max_pixels=config.max_pixels)
        self.prompts = PromptBuilder(self.processor, max_images=config.max_images_per_prompt)
        self.tokenizer = self.prompts.tokenizer
        self.vocab_size = tokenizer_size(self.tokenizer)
        self.vision_ids = vision_token_ids(self.tokenizer)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = model if model is not None else load_hf_model(config, self.prompts.image_processor is not None,
                                                                   device)
        self.device = next(self.model.parameters()).device
        self._lookup = parameter_lookup(self.model)
        self.eos_ids = self._eos_ids()
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_ids[0]
        self._block: BlockTokens | None = None

    def _eos_ids(self) -> list[int]:
        ids = set()
        gen_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        for value in (gen_eos, self.tokenizer.eos_token_id):
            if isinstance(value, int):
                ids.add(value)
            elif value is not None:
                ids.update(int(v) for v in value)
        if not ids:
            raise ValueError("neither the tokenizer nor the generation config names an EOS token")
        return sorted(ids)

    # ---- generation ---------------------------------------------------------------------------------------------
    def generate(self, requests: Sequence[RolloutRequest], sampling: SamplingConfig, *,
                 on_overlong_prompt: OverlongPolicy | None = None) -> Rollouts:
        prepared, skipped = prepare_batch(self.prompts, requests, on_overlong_prompt or self.config.on_overlong_prompt,
                                          self.config.prompt_limit)
        rows = [(p, k) for p in prepared for k in range(sampling.n)]
        samples: list[RolloutSample] = []
        size = self.config.hf_batch_size or max(len(rows), 1)  # None: one generate call for every row
        for start in range(0, len(rows), size):
            samples.extend(self._generate_rows(rows[start:start + size], sampling))
        return Rollouts(samples=samples, num_requests=len(requests), n=sampling.n,
                        logprobs_mode=self.config.logprobs_mode,
                        logprobs_temperature=logprobs_temperature(self.config.logprobs_mode, sampling.temperature),
                        skipped=skipped)

    def _batch_inputs(self, rows: list[tuple[PreparedPrompt, int]]) -> dict[str, torch.Tensor]:
        width = max(len(p.prompt_ids) for p, _ in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (p, _) in enumerate(rows):
            ids[i, width - len(p.prompt_ids):] = torch.tensor(p.prompt_ids)
            mask[i, width - len(p.prompt_ids):] = 1
        batch = {"input_ids": ids, "attention_mask": mask}
        if self.prompts.image_processor is not None:
            mm = torch.zeros_like(ids)
            for i, (p, _) in enumerate(rows):
                if p.image_inputs is not None:
                    mm[i, width - len(p.prompt_ids):] = p.image_inputs.mm_token_type_ids
            batch["mm_token_type_ids"] = mm
            with_images = [p.image_inputs for p, _ in rows if p.image_inputs is not None]
            if with_images:
                batch["pixel_values"] = torch.cat([x.pixel_values for x in with_images]).to(self.model.dtype)
                batch["image_grid_thw"] = torch.cat([x.image_grid_thw for x in with_images])
        return {k: v.to(self.device) for k, v in batch.items()}

    def _generation_config(self, s: SamplingConfig):
        from transformers import GenerationConfig

        sample = s.temperature > 0
        return GenerationConfig(
            # explicit top_k=0 / top_p=1.0: left as None, transformers fills in its defaults (top_k=50)
            do_sample=sample, temperature=s.temperature if sample else None, top_p=s.top_p if sample else None,
            top_k=s.top_k if sample else None, max_new_tokens=s.max_tokens, eos_token_id=self.eos_ids,
            pad_token_id=self.pad_id,
            stop_strings=list(s.stop) or None, return_dict_in_generate=True,
            output_scores=self.config.logprobs_mode == "processed", output_logits=self.config.logprobs_mode == "raw")

    def _logits_processors(self, s: SamplingConfig):
        from transformers import LogitsProcessorList

        block = self.config.block_special_tokens if s.block_special_tokens is None else s.block_special_tokens
        if not (block and self.vision_ids):
            return LogitsProcessorList()
        if self._block is None:
            self._block = BlockTokens(self.vision_ids, self.device)
        return LogitsProcessorList([self._block])

    @torch.no_grad()
    def _generate_rows(self, rows: list[tuple[PreparedPrompt, int]], s: SamplingConfig) -> list[RolloutSample]:
        batch = self._batch_inputs(rows)
        width = batch["input_ids"].shape[1]
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            if s.seed is not None:
                torch.manual_seed(request_seed(s.seed, rows[0][0].index))
            out = self.model.generate(**batch, generation_config=self._generation_config(s),
                                      logits_processor=self._logits_processors(s),
                                      tokenizer=self.tokenizer if s.stop else None)
        generated = out.sequences[:, width:]
        steps = out.scores if self.config.logprobs_mode == "processed" else out.logits
        if s.logprobs:
            token_logprobs = torch.stack([torch.log_softmax(step.float(), dim=-1).gather(
                -1, generated[:, t:t + 1])[:, 0] for t, step in enumerate(steps)], dim=1).cpu()
        samples = []
        for i, (p, k) in enumerate(rows):
            room = self.config.max_model_len - len(p.prompt_ids)
            ids, finish = self._cut(generated[i].tolist(), s.stop, min(room, s.max_tokens))
            has_vision, has_oov = flag_response(ids, self.vision_ids, self.vocab_size)
            samples.append(RolloutSample(
                group=p.index, index_in_group=k, prompt_ids=p.prompt_ids, response_ids=ids,
                response_text=self._text(ids, s.stop), finish_reason=finish,
                logprobs=token_logprobs[i, :len(ids)].clone() if s.logprobs else None, image_inputs=p.image_inputs,
                has_vision_tokens=has_vision, has_out_of_vocab=has_oov))
        return samples

    def _cut(self, ids: list[int], stop: tuple[str, ...], limit: int) -> tuple[list[int], str]:
        eos = set(self.eos_ids)
        for t, token in enumerate(ids[:limit]):
            if token in eos:
                return ids[:t + 1], "stop"
        ids = ids[:limit]
        if stop:
            end = self._stop_string_end(ids, stop)
            if end is not None:
                return ids[:end], "stop"
        return ids, "length"

    def _stop_string_end(self, ids: list[int], stop: tuple[str, ...]) -> int | None:
        """Smallest k with a stop string in decode(ids[:k]) (monotone in k: binary search)."""
        def hit(k: int) -> bool:
            text = self._decode(ids[:k])
            return any(s in text for s in stop)

        if not hit(len(ids)):
            return None
        lo, hi = 1, len(ids)
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if hit(mid) else (mid + 1, hi)
        return lo

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode([t for t in ids if 0 <= t < self.vocab_size], skip_special_tokens=True)

    def _text(self, ids: list[int], stop: tuple[str, ...]) -> str:
        text = self._decode(ids)
        cuts = [text.find(s) for s in stop if s in text]
        return text[:min(cuts)] if cuts else text

    # ---- weight sync / memory -----------------------------------------------------------------------------------
    def update_weights(self, weights: WeightsInput) -> WeightSyncStats:
        """Copy (name, tensor) pairs or buckets of pairs (HF names, any subset) into the model in place."""
        start = time.perf_counter()
        tensors, nbytes = copy_into_module(self._lookup, iter_weight_pairs(weights))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return WeightSyncStats(tensors=tensors, bytes=nbytes, seconds=time.perf_counter() - start, method="copy")

    def sleep(self, level: int = 1) -> None:
        """Nothing to free: the HF engine holds no KV cache between calls."""

    def wake_up(self, tags: Sequence[str] | None = None) -> None:
        """See sleep()."""
