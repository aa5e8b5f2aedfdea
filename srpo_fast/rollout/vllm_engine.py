"""vLLM rollout engine, colocated in the trainer's process, with in-place weight sync.

Why in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, set before vLLM is imported or built): the engine core then runs
in this process, so `collective_rpc` hands the worker our tensors by reference — a weight sync is a device copy,
with no serialization, no IPC handles and no disk. It is also what lets each torchrun rank own one engine
(`distributed_executor_backend="external_launcher"`, after `init_process_group`), and it avoids a second CUDA
context per GPU. Side effects on the host process (docs/platform.md): vLLM reseeds python/numpy/torch to its
seed (we save and restore the RNG states around construction), makes `torch.set_num_threads` a no-op on CPU and
calls `gc.freeze()`; shutting an in-process engine down destroys the default process group, so keep the engine
alive until the end of training. Several engines in one process share vLLM's global parallel state and some modules
(its rotary-embedding cache): destroying one — garbage collection included — breaks the others.

Log-probs (`RolloutEngineConfig.logprobs_mode`, a vLLM engine setting):
  "processed"  log-probs of the distribution actually sampled from: logits / T, top-k/top-p applied, blocked tokens
               removed. The trainer's `linear_token_logprobs(..., temperature=T)` reproduces them when top-k/top-p
               are off, up to log(1 - p(blocked tokens)). Greedy calls (T = 0) return them at T = 1.
  "raw"        log-softmax of the unmodified logits at T = 1, whatever the sampling settings: matches
               `linear_token_logprobs(..., temperature=1.0)` exactly.
`Rollouts.logprobs_temperature` says which temperature the trainer must use to compare.

Weight sync (`update_weights`): one `collective_rpc` that streams all pairs (buckets flattened lazily) into the live
model, then resets the prefix, multimodal and encoder caches.
  "reload"  vLLM's public in-place `reload_weights(weights_iterator=...)` (layerwise reload): the route vLLM's own
            weight-transfer engines use; handles weights vLLM repacks after loading (all linear layers on CPU,
            quantized ones anywhere). A fused layer (q/k/v, gate/up) is rebuilt from what one update brings, so a
            partial update must carry whole fused groups — checked up front when the input is a list.
  "direct"  `model.load_weights(...)` into the live parameters: one copy per tensor, any subset of names. Valid only
            where vLLM does not transform weights after loading: unquantized models on CUDA.
  "auto"    direct on CUDA for unquantized models, reload otherwise.
One update call streams everything through ONE reload (not one per bucket): a reload call per bucket would rebuild
any fused layer a bucket boundary splits from half its inputs.

Sleep mode (`enable_sleep_mode`, the trainer's engine only; docs/gpu.md): `sleep()` frees the KV cache and moves the
weights to host memory (level 1) or drops them (level 2) while the trainer runs. ONE such engine per process: vLLM
keeps the weights in a process-wide CuMem pool and asserts when a second sleeping engine loads, so building a second
one raises here first. After level 2 only a sync that carries every weight is accepted (a trainable-only sync would
leave the frozen vision tower as garbage, vLLM #29341). Wake order: "weights" → sync → "kv_cache".
"""
from __future__ import annotations

import contextlib
import logging
import os
import random
import time
import weakref
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch

from srpo_fast.models.processor import load_processor

from .guards import VISION_TOKENS, flag_response, request_seed, tokenizer_size, vision_token_ids
from .encoding import PreparedPrompt, PromptBuilder, pixel_bounds, prepare_batch
from .types import (EngineFailure, OverlongPolicy, RolloutEngineConfig, RolloutRequest,
                    Rollouts, RolloutSample, SamplingConfig, WeightPair,
                    logprobs_temperature, WeightsInput, WeightSyncError,
                    WeightSyncStats)
from .weights import (check_fused_groups, check_known_names, checkpoint_weight_names, is_materialized,
                      iter_weight_pairs, name_variants)

_LOGPROBS_MODES = {"processed": "processed_logprobs", "raw": "raw_logprobs"}


@contextlib.contextmanager
def preserve_rng_states():
    """Restore python, numpy and torch (CPU and current CUDA device) RNG states on exit: vLLM seeds them all."""
    py_state, np_state, cpu_state = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    cpu_seed = torch.initial_seed()
    cuda_state = torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.random.set_rng_state(cpu_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state(cuda_state)
        elif torch.cuda.is_available() and torch.cuda.is_initialized():
            # CUDA was first initialized by vLLM: give it the state the caller's torch.manual_seed implied.
            torch.cuda.manual_seed(cpu_seed)


# Layers that hold only buffers computed from the config (rotary caches, the image normalization constants): a
# reload never brings tensors for them, so vLLM warns "<layer>: Failed to load weights" on every sync and puts the
# old (still correct) buffers back. Any other layer named in that warning did miss real weights: kept loud.
_BUFFER_ONLY_LAYERS = ("RotaryEmbedding", "FusedMMInputNorm", "IdentityInputNorm")
# INFO lines a sync triggers each time (reload timing, "Successfully reset prefix cache"): quiet while syncing
_CHATTY_SYNC_LOGGERS = ("vllm.model_executor.model_loader.reload.inplace", "vllm.v1.core.block_pool")
_RELOAD_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"


class _ExpectedReloadWarnings(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage().endswith(": Failed to load weights"):
            return not record.getMessage().split(":")[0].endswith(_BUFFER_ONLY_LAYERS)
        return True


@contextlib.contextmanager
def quiet_expected_sync_logs():
    """Scoped to one weight sync: drop the per-sync INFO lines and the expected buffer-only warnings; every other
    warning (a layer that really missed its weights) still prints."""
    chatty = [logging.getLogger(name) for name in _CHATTY_SYNC_LOGGERS]
    levels = [logger.level for logger in chatty]
    reload_logger, expected = logging.getLogger(_RELOAD_LOGGER), _ExpectedReloadWarnings()
    for logger in chatty:
        logger.setLevel(logging.WARNING)
    reload_logger.addFilter(expected)
    try:
        yield
    finally:
        reload_logger.removeFilter(expected)
        for logger, level in zip(chatty, levels):
            logger.setLevel(level)


class _TrackedStream:
    """Passes weight pairs through, counting them; checks each name, and the fused groups once exhausted (the
    checks of a lazy stream can only fail part-way through a sync)."""

    def __init__(self, pairs: Iterator[WeightPair], known_names: set[str] | None, packed_modules_mapping: dict | None):
        self._pairs = pairs
        self._known = known_names
        self._packed = packed_modules_mapping
        self.names: list[str] = []
        self.tensors = 0
        self.bytes = 0

    def __iter__(self) -> Iterator[WeightPair]:
        for name, tensor in self._pairs:
            if self._known is not None:
                check_known_names([name], self._known)
            self.names.append(name)
            self.tensors += 1
            self.bytes += tensor.numel() * tensor.element_size()
            yield name, tensor
        if self._packed is not None:
            check_fused_groups(self.names, self._packed)


def _worker_packed_modules_mapping(worker) -> dict:
    return dict(getattr(worker.model_runner.get_model(), "packed_modules_mapping", {}) or {})


def _worker_finish_failed_reload(worker) -> None:
    """Undo what a reload aborted part-way left behind: layers on the meta device with wrapped loaders. vLLM shares
    some modules between engines of one process (its rotary-embedding cache), so leaving them would break every
    engine, not just this one. Unloaded layers get their previous tensors back."""
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

    with set_current_vllm_config(worker.vllm_config):
        finalize_layerwise_reload(worker.model_runner.get_model(), worker.vllm_config.model_config)


def _worker_load_weights_direct(worker, weights: Iterable[WeightPair]) -> None:
    """model.load_weights into the live parameters, then drop the runner's encoder / multimodal caches (what the
    worker's reload_weights does after its own load)."""
    from vllm.config import set_current_vllm_config

    runner = worker.model_runner
    with set_current_vllm_config(worker.vllm_config):
        runner.get_model().load_weights(weights)
    runner.reset_encoder_cache()
    runner.reset_mm_cache()


_SLEEP_MODE_OWNER: weakref.ref[VLLMEngine] | None = None


def _claim_sleep_mode(engine: VLLMEngine) -> None:
    """One engine with sleep mode per process: vLLM puts its weights in the process-wide CuMem pool and asserts
    ("CuMem allocator can only be used for one instance per process") when a second one loads. Checked on every
    device, before anything starts, so CPU runs catch what would crash on a GPU."""
    global _SLEEP_MODE_OWNER
    owner = _SLEEP_MODE_OWNER() if _SLEEP_MODE_OWNER is not None else None
    if owner is not None and owner is not engine and not owner._shut_down:
        raise RuntimeError(f"an engine with enable_sleep_mode=True already lives in this process ({owner.config.model}"
                           "); vLLM allows one sleeping engine per process: build this one with "
                           "enable_sleep_mode=False, or shut the other down first (docs/gpu.md)")
    _SLEEP_MODE_OWNER = weakref.ref(engine)


class VLLMEngine:
    """Rollouts from a colocated vLLM engine. See the module docstring for log-prob modes and weight sync."""

    def __init__(self, config: RolloutEngineConfig):
        self.config = config
        self.processor = load_processor(config.model, min_pixels=config.min_pixels, max_pixels=config.max_pixels)
        self.prompts = PromptBuilder(self.processor, max_images=config.max_images_per_prompt)
        self.tokenizer = self.prompts.tokenizer
        self.vocab_size = tokenizer_size(self.tokenizer)
        self.vision_ids = vision_token_ids(self.tokenizer)
        self._bad_words, self._blocked_bias = self._blocking_rules()
        self._asleep: set[str] = set()
        self._broken: str | None = None
        self._weights_discarded = False  # a level-2 sleep dropped them: only a full sync brings them back
        self._shut_down = False
        if config.enable_sleep_mode:
            _claim_sleep_mode(self)
        self.llm = self._start()
        self.on_gpu = self.llm.llm_engine.vllm_config.device_config.device.type == "cuda"
        self.can_sleep = self.on_gpu and config.enable_sleep_mode
        self._quantized = self.llm.llm_engine.vllm_config.model_config.quantization is not None
        self.sync_method = self._resolve_sync_method()
        self.packed_modules_mapping = self.llm.collective_rpc(_worker_packed_modules_mapping)[0]
        self.weight_names = checkpoint_weight_names(config.model)

    # ---- construction -------------------------------------------------------------------------------------------
    def _engine_kwargs(self) -> dict:
        cfg = self.config
        kwargs = dict(model=str(cfg.model), dtype=cfg.dtype, max_model_len=cfg.max_model_len,
                      max_num_seqs=cfg.max_num_seqs, seed=cfg.seed, enforce_eager=cfg.enforce_eager,
                      enable_prefix_caching=cfg.enable_prefix_caching, tensor_parallel_size=cfg.tensor_parallel_size,
                      logprobs_mode=_LOGPROBS_MODES[cfg.logprobs_mode],
                      gpu_memory_utilization=cfg.gpu_memory_utilization)
        if cfg.kv_cache_bytes is not None:
            kwargs["kv_cache_memory_bytes"] = int(cfg.kv_cache_bytes)
            # On CPU this variable overrides kv_cache_memory_bytes (docs/platform.md): the explicit setting wins.
            os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
        if torch.cuda.is_available() and cfg.enable_sleep_mode:
            kwargs["enable_sleep_mode"] = True
        if self.prompts.image_processor is not None:
            low, high = pixel_bounds(self.prompts.image_processor)
            kwargs["limit_mm_per_prompt"] = {"image": cfg.max_images_per_prompt, "video": 0}
            kwargs["mm_processor_kwargs"] = {"size": {"shortest_edge": low, "longest_edge": high}}
        import torch.distributed as dist

        under_torchrun = "RANK" in os.environ and "LOCAL_RANK" in os.environ
        if under_torchrun and dist.is_available() and dist.is_initialized():
            # (an earlier in-process engine also initializes torch.distributed, world 1, without torchrun's env:
            # that case keeps the default executor)
            kwargs["distributed_executor_backend"] = "external_launcher"
        elif under_torchrun and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise RuntimeError("running under torchrun: call torch.distributed.init_process_group before creating "
                               "the engine (vLLM's external launcher joins the existing group)")
        return kwargs

    def _start(self):
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        kwargs = self._engine_kwargs()
        with preserve_rng_states():
            from vllm import LLM

            return LLM(**kwargs)

    def _resolve_sync_method(self) -> str:
        method = self.config.sync_method
        if method == "direct" and (not self.on_gpu or self._quantized):
            raise ValueError("sync_method='direct' needs an unquantized model on CUDA (vLLM repacks weights after "
                             "loading on CPU and for quantized layers); use 'reload' or 'auto'")
        if method == "auto":
            return "direct" if self.on_gpu and not self._quantized else "reload"
        return method

    def _blocking_rules(self) -> tuple[list[str], dict[int, float]]:
        """Vision tokens to block: via bad_words (-inf) when the token string encodes to its single id, else a
        -100 logit bias (vLLM's clamp)."""
        bad_words, bias = [], {}
        vocab = self.tokenizer.get_vocab()
        for token in VISION_TOKENS:
            if token not in vocab:
                continue
            if self.tokenizer.encode(token, add_special_tokens=False) == [vocab[token]]:
                bad_words.append(token)
            else:
                bias[vocab[token]] = -100.0
        return bad_words, bias

    # ---- generation ---------------------------------------------------------------------------------------------
    def generate(self, requests: Sequence[RolloutRequest], sampling: SamplingConfig, *,
                 on_overlong_prompt: OverlongPolicy | None = None) -> Rollouts:
        """Sample `sampling.n` responses per request; see `Rollouts`."""
        self._check_usable(need={"weights", "kv_cache"})
        if self._weights_discarded:
            raise RuntimeError("a level-2 sleep discarded this engine's weights: sync the full state "
                               "(update_weights with every weight) before generating")
        prepared, skipped = prepare_batch(self.prompts, requests, on_overlong_prompt or self.config.on_overlong_prompt,
                                          self.config.prompt_limit)
        inputs = [self._engine_input(p) for p in prepared]
        params = [self._sampling_params(sampling, p.index) for p in prepared]
        outputs = self._run(inputs, params, prepared) if prepared else []
        samples = []
        for p, out in zip(prepared, outputs):
            engine_prompt = list(out.prompt_token_ids)
            if engine_prompt != p.prompt_ids:
                raise EngineFailure(p.index, f"vLLM expanded the prompt to {len(engine_prompt)} tokens but the "
                                             f"processor to {len(p.prompt_ids)}: image resolution settings differ")
            for k, completion in enumerate(sorted(out.outputs, key=lambda c: c.index)):
                samples.append(self._sample(p, k, completion, sampling.logprobs))
        if not sampling.stop:  # detokenize=False: vLLM returned ids only
            texts = self.tokenizer.batch_decode([[t for t in s.response_ids if 0 <= t < self.vocab_size]
                                                 for s in samples], skip_special_tokens=True)
            for sample, text in zip(samples, texts):
                sample.response_text = text
        return Rollouts(samples=samples, num_requests=len(requests), n=sampling.n,
                        logprobs_mode=self.config.logprobs_mode,
                        logprobs_temperature=logprobs_temperature(self.config.logprobs_mode, sampling.temperature),
                        skipped=skipped)

    def _engine_input(self, p: PreparedPrompt):
        from vllm.inputs import TokensPrompt

        if p.images:
            return TokensPrompt(prompt_token_ids=p.engine_ids, multi_modal_data={"image": list(p.images)})
        return TokensPrompt(prompt_token_ids=p.engine_ids)

    def _sampling_params(self, s: SamplingConfig, index: int):
        from vllm import SamplingParams

        block = self.config.block_special_tokens if s.block_special_tokens is None else s.block_special_tokens
        return SamplingParams(
            n=s.n, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, max_tokens=s.max_tokens,
            stop=list(s.stop) or None, seed=None if s.seed is None else request_seed(s.seed, index),
            logprobs=0 if s.logprobs else None, skip_special_tokens=True,
            # vLLM detokenizes every step of every sequence in Python, logprob tokens included (about a fifth of a
            # CPU rollout's time); stop strings need that, otherwise one batched decode at the end gives the text
            detokenize=bool(s.stop),
            bad_words=list(self._bad_words) if block and self._bad_words else None,
            logit_bias=dict(self._blocked_bias) if block and self._blocked_bias else None)

    def _run(self, inputs: list, params: list, prepared: list[PreparedPrompt]) -> list:
        try:
            return self.llm.generate(inputs, params, use_tqdm=False)
        except Exception as exc:
            raise EngineFailure(self._locate_failure(inputs, prepared), f"{type(exc).__name__}: {exc}") from exc

    def _locate_failure(self, inputs: list, prepared: list[PreparedPrompt]) -> int | None:
        """Replay each request alone for one token; the first that fails is the culprit."""
        from vllm import SamplingParams

        probe = SamplingParams(max_tokens=1)
        for inp, p in zip(inputs, prepared):
            try:
                self.llm.generate([inp], probe, use_tqdm=False)
            except Exception:
                return p.index
        return None

    def _sample(self, p: PreparedPrompt, k: int, completion, want_logprobs: bool) -> RolloutSample:
        ids = list(completion.token_ids)
        logprobs = None
        if want_logprobs:
            logprobs = torch.tensor([step[t].logprob for step, t in zip(completion.logprobs, ids)],
                                    dtype=torch.float32)
        has_vision, has_oov = flag_response(ids, self.vision_ids, self.vocab_size)
        return RolloutSample(group=p.index, index_in_group=k, prompt_ids=p.prompt_ids, response_ids=ids,
                             response_text=completion.text, logprobs=logprobs,
                             finish_reason=completion.finish_reason or "abort", image_inputs=p.image_inputs,
                             has_vision_tokens=has_vision, has_out_of_vocab=has_oov)

    # ---- weight sync --------------------------------------------------------------------------------------------
    def update_weights(self, weights: WeightsInput) -> WeightSyncStats:
        """Stream (name, tensor) pairs or buckets of pairs into the live engine, in place, then reset its caches.

        Names are HF names (either Qwen-VL layout); any subset of the model's weights may be sent (e.g. the language
        model and lm_head only), with the "reload" method in whole fused groups. A list input is checked (kind,
        names, fused groups) before anything is loaded; a lazy iterator is checked as it streams, so a bad one fails
        part-way and leaves the engine unusable (RuntimeError on the next call). Tensors may live on any device and
        dtype; the engine's loaders copy and cast them."""
        self._check_usable(need={"weights"})
        check_groups = self.sync_method == "reload"
        known = self.weight_names
        if is_materialized(weights):  # names checked before anything is loaded
            names = [name for name, _ in iter_weight_pairs(weights)]
            check_known_names(names, known)
            if check_groups:
                check_fused_groups(names, self.packed_modules_mapping)
            self._check_covers_discarded(names)
            check_groups, known = False, None
        stream = _TrackedStream(iter_weight_pairs(weights), known,
                                self.packed_modules_mapping if check_groups else None)
        start = time.perf_counter()
        try:
            with quiet_expected_sync_logs():
                self._load_stream(stream)
        except Exception as exc:
            self._broken = f"a weight sync failed part-way ({type(exc).__name__}: {exc})"
            if self.sync_method == "reload":
                self.llm.collective_rpc(_worker_finish_failed_reload)
            if isinstance(exc, (WeightSyncError, TypeError)):
                raise
            raise WeightSyncError(f"weight sync failed: {type(exc).__name__}: {exc}") from exc
        if self._weights_discarded:  # a lazy stream is only known once consumed
            try:
                self._check_covers_discarded(stream.names)
            except WeightSyncError as exc:
                self._broken = str(exc)
                raise
            self._weights_discarded = False
        with quiet_expected_sync_logs():
            self._reset_caches()
        if self.on_gpu:
            torch.cuda.synchronize()
        return WeightSyncStats(tensors=stream.tensors, bytes=stream.bytes, seconds=time.perf_counter() - start,
                               method=self.sync_method)

    def _load_stream(self, stream: _TrackedStream) -> None:
        if self.sync_method == "reload":
            self.llm.collective_rpc("reload_weights", kwargs=dict(weights_iterator=iter(stream)))
        else:
            self.llm.collective_rpc(_worker_load_weights_direct, args=(iter(stream),))

    def _reset_caches(self) -> None:
        """Prefix-cache blocks, processed images and encoder outputs were all computed with the old weights."""
        self.llm.reset_prefix_cache()
        if self.prompts.image_processor is not None:
            self.llm.reset_mm_cache()
            self.llm.llm_engine.reset_encoder_cache()

    # ---- memory ---------------------------------------------------------------------------------------------------
    def _check_covers_discarded(self, names: Sequence[str]) -> None:
        """After a level-2 sleep every weight is garbage until synced: a partial sync (e.g. trainable weights only,
        vision tower frozen) would leave the rest as garbage, silently (vLLM #29341)."""
        if not self._weights_discarded:
            return
        missing = sorted(self.weight_names - {variant for name in names for variant in name_variants(name)})
        if missing:
            raise WeightSyncError(f"a level-2 sleep discarded the engine's weights, so a sync must carry all of them; "
                                  f"{len(missing)} are missing (e.g. {missing[:3]}): sync the full state, or sleep "
                                  "at level 1 for partial syncs")

    def sleep(self, level: int = 1) -> None:
        """Free the KV cache and offload (level 1) or drop (level 2) the weights, for training. Without
        enable_sleep_mode a no-op. On CPU nothing is freed, but the state is kept as on a GPU (generate refuses while
        asleep), so CPU runs check the call order a GPU needs.

        Level 2 is for full syncs only: wake ["weights"], update ALL weights (a partial update is refused), then
        wake ["kv_cache"]. Partial syncs (a frozen vision tower) need level 1."""
        if level not in (1, 2):
            raise ValueError(f"level must be 1 or 2, got {level}")
        if not self.config.enable_sleep_mode or self._asleep:
            return
        if level == 2 and self.weight_names is None:
            raise ValueError(f"level 2 needs the checkpoint's weight names to check the full sync after it, and "
                             f"{self.config.model} has no safetensors files: use level 1")
        if self.can_sleep:
            self.llm.reset_prefix_cache()
            self.llm.sleep(level=level)
        self._asleep = {"weights", "kv_cache"}
        self._weights_discarded = self._weights_discarded or level == 2

    def wake_up(self, tags: Sequence[str] | None = None) -> None:
        """Reallocate `tags` (default: everything). No-op when not asleep. The trainer wakes "weights", syncs, then
        wakes "kv_cache", so the KV cache is not allocated while the sync's buffers are."""
        wanted = set(tags) if tags is not None else {"weights", "kv_cache"}
        unknown = wanted - {"weights", "kv_cache"}
        if unknown:
            raise ValueError(f"tags must be among 'weights', 'kv_cache', got {sorted(unknown)}")
        if not wanted & self._asleep:
            return
        if self.can_sleep:
            self.llm.wake_up(tags=sorted(wanted & self._asleep))
        self._asleep -= wanted

    def _check_usable(self, need: set[str]) -> None:
        if self._broken is not None:
            raise RuntimeError(f"this engine's weights are in an undefined state: {self._broken}; build a new engine")
        sleeping = need & self._asleep
        if sleeping:
            raise RuntimeError(f"engine is asleep ({sorted(sleeping)}); call wake_up() first")

    def shutdown(self) -> None:
        """Stop the engine core. In-process this also tears down torch.distributed's default group (vLLM cleanup):
        call it only at the very end."""
        self.llm.llm_engine.engine_core.shutdown()
        self._shut_down = True

