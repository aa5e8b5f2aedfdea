"""Rollout building blocks without an engine: weight streams and buckets, fused-group and name checks, prompt
preparation vs the processor, guard helpers, config validation."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from srpo_fast.models.processor import load_processor
from srpo_fast.rollout import (InvalidRequestError, RolloutEngineConfig, RolloutRequest, SamplingConfig,
                               WeightSyncError, bucket_by_bytes, iter_weight_pairs)
from srpo_fast.rollout.guards import flag_response, request_seed, vision_token_ids
from srpo_fast.rollout.encoding import PromptBuilder
from srpo_fast.rollout.weights import (check_known_names, checkpoint_weight_names, copy_into_module,
                                       fused_group_gaps, is_materialized, parameter_lookup)

QWEN_PACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"], "qkv": ["qkv"]}


def random_pairs(seed=0, n=9):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(int(a), int(b)) for a, b in torch.randint(1, 40, (n, 2), generator=gen)]
    return [(f"layer{i}.w", torch.randn(shape, generator=gen)) for i, shape in enumerate(shapes)]


def test_iter_weight_pairs_accepts_pairs_and_buckets_lazily():
    pairs = random_pairs()
    assert list(iter_weight_pairs(pairs)) == pairs
    assert list(iter_weight_pairs([pairs[:4], pairs[4:]])) == pairs
    assert list(iter_weight_pairs(b for b in (pairs[:2], pairs[2:]))) == pairs
    assert list(iter_weight_pairs([])) == []
    assert is_materialized(pairs) and is_materialized([pairs[:2], pairs[2:]])
    assert not is_materialized(iter(pairs))


@pytest.mark.parametrize("bad", [{"a": torch.zeros(1)}, torch.zeros(3), [("a", 1.0)], [[("a", torch.zeros(1)), 3]]])
def test_iter_weight_pairs_rejects_other_inputs(bad):
    with pytest.raises(TypeError):
        list(iter_weight_pairs(bad))


def test_iter_weight_pairs_checks_the_kind_before_iterating():
    with pytest.raises(TypeError):
        iter_weight_pairs({"a": torch.zeros(1)})  # no list(): the error comes before any pair is consumed
    with pytest.raises(TypeError):
        iter_weight_pairs(iter([3]))


@pytest.mark.parametrize("pack", [False, True])
@pytest.mark.parametrize("bucket_bytes", [1, 700, 4000, 1 << 20])
def test_bucket_by_bytes_bounds_sizes_and_keeps_values(pack, bucket_bytes):
    pairs = random_pairs(seed=bucket_bytes)
    buckets = list(bucket_by_bytes(iter(pairs), bucket_bytes, pack=pack))
    flat = [p for b in buckets for p in b]
    assert [n for n, _ in flat] == [n for n, _ in pairs]
    for (_, a), (_, b) in zip(flat, pairs):
        assert torch.equal(a, b)
    for bucket in buckets:
        size = sum(t.numel() * 4 for _, t in bucket)
        assert size <= bucket_bytes or len(bucket) == 1
        if pack:  # one flat buffer per bucket
            assert len({t.untyped_storage().data_ptr() for _, t in bucket}) == 1
    if bucket_bytes == 1 << 20:
        assert len(buckets) == 1


def test_bucket_by_bytes_starts_a_new_bucket_on_dtype_change():
    half = torch.zeros(4, dtype=torch.bfloat16)
    pairs = [("a", torch.zeros(4)), ("b", half), ("c", half.clone())]
    assert [[n for n, _ in b] for b in bucket_by_bytes(pairs, 1 << 20, pack=True)] == [["a"], ["b", "c"]]
    with pytest.raises(ValueError, match="bucket_bytes"):
        list(bucket_by_bytes(pairs, 0))


def test_fused_group_gaps():
    attn = "model.language_model.layers.3.self_attn"
    full = [f"{attn}.{m}.{p}" for m in ("q_proj", "k_proj", "v_proj") for p in ("weight", "bias")]
    assert fused_group_gaps(full + [f"{attn}.o_proj.weight", "lm_head.weight"], QWEN_PACKED) == []
    assert fused_group_gaps([f"{attn}.q_proj.weight"], QWEN_PACKED) == [f"{attn}.k_proj.weight",
                                                                         f"{attn}.v_proj.weight"]
    only_q_bias = [n for n in full if not n.endswith(("k_proj.bias", "v_proj.bias"))]
    assert fused_group_gaps(only_q_bias, QWEN_PACKED) == [f"{attn}.k_proj.bias", f"{attn}.v_proj.bias"]
    mlp = "model.visual.blocks.0.mlp"
    assert fused_group_gaps([f"{mlp}.up_proj.bias"], QWEN_PACKED) == [f"{mlp}.gate_proj.bias"]
    assert fused_group_gaps(["model.visual.blocks.0.attn.qkv.weight"], QWEN_PACKED) == []


def test_checkpoint_names_cover_both_qwen_vl_layouts(tiny_kit):
    from transformers import AutoModelForImageTextToText

    names = checkpoint_weight_names(tiny_kit["vl"])
    model = AutoModelForImageTextToText.from_pretrained(tiny_kit["vl"], local_files_only=True)
    check_known_names([n for n, _ in model.named_parameters()], names)  # transformers-5 names
    assert "model.layers.0.mlp.up_proj.weight" in names and "visual.blocks.0.attn.qkv.weight" in names
    with pytest.raises(WeightSyncError, match="unknown parameter names"):
        check_known_names(["model.language_model.layers.5.mlp.up_proj.weight"], names)
    lookup = parameter_lookup(model)
    new = torch.randn(model.lm_head.weight.shape[0], 128)
    head = torch.randn(256, 128)
    assert copy_into_module(lookup, [("lm_head.weight", new), ("model.layers.1.mlp.up_proj.weight", head)]) == (
        2, (new.numel() + head.numel()) * 4)
    assert torch.equal(model.lm_head.weight, new)
    assert torch.equal(model.model.language_model.layers[1].mlp.up_proj.weight, head)
    assert checkpoint_weight_names(tiny_kit["vl"].parent) is None


def test_prompt_builder_presizes_images_exactly_as_the_processor(tiny_kit):
    processor = load_processor(tiny_kit["vl"], min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 9)
    builder = PromptBuilder(processor, max_images=3)
    rng = np.random.default_rng(3)
    originals = [Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8))
                 for shape in [(37, 300, 3), (500, 121, 3), (29, 29, 3), (84, 84, 3)]]
    originals.append(Image.fromarray(rng.integers(0, 255, (64, 90), dtype=np.uint8)))  # grayscale
    for image in originals:
        content = [{"type": "text", "text": "look"}, {"type": "image"}]
        p = builder.prepare(0, RolloutRequest(messages=[{"role": "user", "content": content}], images=[image]))
        text = processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)
        enc = processor(text=[text], images=[image], return_tensors="pt")
        assert p.prompt_ids == enc["input_ids"][0].tolist()
        assert torch.equal(p.image_inputs.pixel_values, enc["pixel_values"])
        assert torch.equal(p.image_inputs.mm_token_type_ids, enc["mm_token_type_ids"][0])
        assert p.images[0].size[0] % 28 == 0 and p.images[0].size[1] % 28 == 0
        assert p.engine_ids.count(processor.image_token_id) == 1


def test_prompt_builder_rejects_bad_requests(tiny_kit):
    vl = PromptBuilder(load_processor(tiny_kit["vl"]), max_images=1)
    text = PromptBuilder(load_processor(tiny_kit["text"]), max_images=1)
    image = Image.new("RGB", (56, 56))
    one_image = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "x"}]}]
    with pytest.raises(InvalidRequestError, match="request 4: 1 image\\(s\\) given to a text-only"):
        text.prepare(4, RolloutRequest(messages=[{"role": "user", "content": "x"}], images=[image]))
    with pytest.raises(InvalidRequestError, match="more than max_images_per_prompt"):
        vl.prepare(0, RolloutRequest(messages=one_image, images=[image, image]))
    with pytest.raises(InvalidRequestError, match="PIL"):
        vl.prepare(0, RolloutRequest(messages=one_image, images=[np.zeros((56, 56, 3))]))
    with pytest.raises(InvalidRequestError, match="aspect ratio"):
        vl.prepare(2, RolloutRequest(messages=one_image, images=[Image.new("RGB", (6000, 28))]))
    with pytest.raises(InvalidRequestError, match="0 image placeholder"):
        vl.prepare(0, RolloutRequest(messages=[{"role": "user", "content": "x"}], images=[image]))
    with pytest.raises(InvalidRequestError, match="expected a RolloutRequest"):
        vl.prepare(1, {"messages": one_image})


def test_guards(tiny_kit):
    tok = load_processor(tiny_kit["text"])
    vision = vision_token_ids(tok)
    assert vision == sorted(tok.convert_tokens_to_ids(t) for t in
                            ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"])
    assert flag_response([10, vision[0]], vision, len(tok)) == (True, False)
    assert flag_response([10, len(tok)], vision, len(tok)) == (False, True)
    assert flag_response([10, len(tok) - 1], vision, len(tok)) == (False, False)
    seeds = {request_seed(s, i) for s in range(20) for i in range(50)}
    assert len(seeds) == 1000 and all(0 <= s < 2**31 for s in seeds)
    assert request_seed(5, 3) == request_seed(5, 3)


def test_config_validation():
    for bad in [dict(n=0), dict(temperature=-1.0), dict(top_p=0.0), dict(top_k=-1), dict(max_tokens=0)]:
        with pytest.raises(ValueError, match=next(iter(bad))):
            SamplingConfig(**bad)
    with pytest.raises(TypeError, match="stop"):
        SamplingConfig(stop="</answer>")
    for bad in [dict(on_overlong_prompt="drop"), dict(logprobs_mode="scaled"), dict(sync_method="fast"),
                dict(max_prompt_tokens=4096), dict(tensor_parallel_size=2)]:
        with pytest.raises(ValueError, match=next(iter(bad))):
            RolloutEngineConfig(model="m", **bad)
    assert RolloutEngineConfig(model="m", max_model_len=100).prompt_limit == 99
    with pytest.raises(ValueError, match="exactly one"):
        RolloutRequest(messages=[{"role": "user", "content": "x"}], prompt_ids=[1, 2])
