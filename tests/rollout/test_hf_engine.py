"""HF `generate` fallback engine alone (no vLLM needed): log-probs equal the trainer's recomputation in both modes,
grouping and seeds, stop strings cut like vLLM, in-place weight updates, guard rails."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from test_vllm_engine import (VL_PIXELS, engine_config, hf_pairs, hf_recompute, outputs, perturbed_copy,
                               stop_string_from, text_requests, vl_requests)

from srpo_fast.rollout import HFEngine, InvalidRequestError, RolloutRequest, SamplingConfig, WeightSyncError
from srpo_fast.rollout.guards import vision_token_ids


@pytest.fixture(scope="module")
def text_engine(tiny_kit):
    return HFEngine(engine_config(tiny_kit["text"], logprobs_mode="processed", hf_batch_size=4))


@pytest.fixture(scope="module")
def vl_engine(tiny_kit):
    return HFEngine(engine_config(tiny_kit["vl"], logprobs_mode="raw", **VL_PIXELS))


def test_processed_logprobs_match_recomputation_and_samples_are_grouped(text_engine, tiny_kit):
    sampling = SamplingConfig(n=3, temperature=0.7, max_tokens=10, seed=4, block_special_tokens=False)
    rollouts = text_engine.generate(text_requests(), sampling)  # 9 rows in batches of 4: groups span batches
    assert [(s.group, s.index_in_group) for s in rollouts] == [(g, k) for g in range(3) for k in range(3)]
    assert rollouts.logprobs_temperature == 0.7
    for sample in rollouts:
        assert sample.logprobs.shape == (len(sample.response_ids),)
        torch.testing.assert_close(sample.logprobs, hf_recompute(text_engine.model, sample, 0.7), atol=3e-4, rtol=0)
    again = text_engine.generate(text_requests(), sampling)
    assert [s.response_ids for s in again] == [s.response_ids for s in rollouts]


def test_raw_logprobs_match_recomputation_with_images(vl_engine):
    rollouts = vl_engine.generate(vl_requests(), SamplingConfig(n=2, temperature=1.0, max_tokens=10, seed=1))
    assert rollouts.logprobs_mode == "raw" and rollouts.logprobs_temperature == 1.0
    assert rollouts[0].image_inputs is not None and rollouts[2].image_inputs is None
    for sample in rollouts:
        torch.testing.assert_close(sample.logprobs, hf_recompute(vl_engine.model, sample, 1.0), atol=3e-4, rtol=0)


def test_stop_strings_cut_after_the_completing_token(text_engine):
    request = text_requests()[:1]
    free = text_engine.generate(request, SamplingConfig(temperature=0.0, max_tokens=12))[0]
    end, stop = stop_string_from(text_engine.tokenizer, free.response_ids)
    cut = text_engine.generate(request, SamplingConfig(temperature=0.0, max_tokens=12, stop=(stop,)))[0]
    assert cut.finish_reason == "stop"
    assert cut.response_ids == free.response_ids[:end]
    assert cut.response_text == free.response_text.split(stop)[0]
    assert torch.equal(cut.logprobs, free.logprobs[:end])


def test_update_weights_partial_and_checked(tiny_kit, tmp_path):
    engine = HFEngine(engine_config(tiny_kit["text"]))
    new_dir = perturbed_copy(tiny_kit["text"], tmp_path / "text_b", seed=3)
    new = dict(hf_pairs(new_dir, vl=False))
    before = outputs(engine.generate(text_requests(), SamplingConfig(temperature=0.0, max_tokens=8)))
    stats = engine.update_weights([[("lm_head.weight", new["lm_head.weight"])],
                                   [("model.norm.weight", new["model.norm.weight"])]])
    assert stats.tensors == 2 and stats.bytes == (1152 * 128 + 128) * 4
    params = dict(engine.model.named_parameters())
    assert torch.equal(params["lm_head.weight"].cpu(), new["lm_head.weight"])
    assert not torch.equal(params["model.layers.0.mlp.up_proj.weight"].cpu(), new["model.layers.0.mlp.up_proj.weight"])
    after = outputs(engine.generate(text_requests(), SamplingConfig(temperature=0.0, max_tokens=8)))
    assert [x[1] for x in after] != [x[1] for x in before]
    with pytest.raises(WeightSyncError, match="unknown parameter name"):
        engine.update_weights([("model.layers.7.mlp.up_proj.weight", torch.zeros(256, 128))])
    with pytest.raises(WeightSyncError, match="shape"):
        engine.update_weights([("lm_head.weight", torch.zeros(10, 128))])


def test_guard_rails(tiny_kit):
    engine = HFEngine(engine_config(tiny_kit["text"]))
    vision = vision_token_ids(engine.tokenizer)
    with torch.no_grad():  # vision tokens dominate every next-token distribution
        head = engine.model.lm_head.weight
        keep = torch.zeros(head.shape[0], dtype=torch.bool, device=head.device)
        keep[vision] = True
        head[~keep] *= 0.05
    sampling = SamplingConfig(n=4, temperature=1.0, max_tokens=8, seed=2)
    leaked = engine.generate(text_requests(), dataclasses.replace(sampling, block_special_tokens=False))
    flagged = [s for s in leaked if s.has_vision_tokens]
    assert flagged and flagged == [s for s in leaked if set(s.response_ids) & set(vision)]
    blocked = engine.generate(text_requests(), sampling)
    assert blocked.stats["flagged_vision_tokens"] == 0
    assert all(not (set(s.response_ids) & set(vision)) for s in blocked)
    long = [text_requests()[0], RolloutRequest(prompt_ids=[100] * 300)]
    with pytest.raises(InvalidRequestError, match="request 1"):
        engine.generate(long, sampling)
    skipped = engine.generate(long, sampling, on_overlong_prompt="skip")
    assert set(skipped.skipped) == {1} and {s.group for s in skipped} == {0}
    # under "skip" an invalid request (here: an image given to a text model) is skipped with its reason too
    from PIL import Image

    bad = [RolloutRequest(messages=[{"role": "user", "content": "x"}], images=[Image.new("RGB", (56, 56))]),
           text_requests()[0]]
    with pytest.raises(InvalidRequestError, match="request 0: 1 image"):
        engine.generate(bad, sampling)
    mixed = engine.generate(bad, sampling, on_overlong_prompt="skip")
    assert list(mixed.skipped) == [0] and "text-only" in mixed.skipped[0] and {s.group for s in mixed} == {1}
