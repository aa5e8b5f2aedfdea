"""data/packing.py: the packed-row layout, sample checks, dummy rows, and M-RoPE ids against the model's own
get_rope_index (the planner that decides which samples share a row is tested in tests/train/test_batches.py)."""
import random

import pytest
import torch

from srpo_fast.data.packing import MRopeIndexer, PackedBatch, Sample, dummy_batch, pack_samples


def text_sample(rng, prompt_len, response_len, masked=False):
    mask = [float(rng.random() < 0.7) for _ in range(response_len)] if masked else None
    return Sample([rng.randrange(5, 900) for _ in range(prompt_len)],
                  [rng.randrange(5, 900) for _ in range(response_len)], response_mask=mask)


def test_pack_samples_layout():
    rng = random.Random(0)
    samples = [text_sample(rng, p, r, masked=True) for p, r in [(3, 2), (5, 4), (1, 1), (4, 6)]]
    b = pack_samples(samples, sample_indices=[7, 2, 5, 0])
    lens = [s.num_tokens for s in samples]
    assert b.input_ids.shape == (1, sum(lens)) and b.input_ids.dtype == torch.int64
    assert b.cu_seqlens.dtype == torch.int32 and b.cu_seqlens.tolist() == [0, 5, 14, 16, 26]
    assert b.max_seqlen == 10 and b.num_sequences == 4 and b.num_tokens == 26
    assert b.position_ids.shape == (1, 26)
    assert b.position_ids[0].tolist() == [i for n in lens for i in range(n)]
    assert b.response_cu_seqlens.dtype == torch.int32 and b.response_cu_seqlens.tolist() == [0, 2, 6, 7, 13]
    expected_targets = torch.cat([s.response_ids for s in samples])
    assert torch.equal(b.targets, expected_targets)
    # every target position is preceded, inside its own sequence, by at least one token
    starts = b.cu_seqlens[:-1].repeat_interleave(torch.tensor([s.response_ids.numel() for s in samples]))
    assert bool((b.target_positions - 1 >= starts).all())
    assert torch.equal(b.loss_mask, torch.cat([s.response_mask for s in samples]))
    assert b.pixel_values is None and b.mm_token_type_ids is None and not b.is_dummy
    # gathering per-sample values into row order
    per_token = {i: torch.arange(s.response_ids.numel()) + 100 * i for i, s in zip([7, 2, 5, 0], samples)}
    values = [per_token.get(i, torch.zeros(0)) for i in range(8)]
    assert torch.equal(b.gather_response(values), torch.cat([per_token[i] for i in [7, 2, 5, 0]]))
    assert b.gather_sequences(torch.arange(8.0) * 10).tolist() == [70.0, 20.0, 50.0, 0.0]
    with pytest.raises(ValueError, match="values\\[2\\]"):
        b.gather_response([torch.zeros(2)] * 8)  # right for sample 7 (2 tokens), wrong for 2


def test_sample_validation():
    with pytest.raises(ValueError, match="response_ids is empty"):
        Sample([1, 2], [])
    with pytest.raises(TypeError, match="prompt_ids"):
        Sample(torch.ones(2, 2, dtype=torch.long), [1])
    with pytest.raises(TypeError, match="prompt_ids"):
        Sample(torch.ones(3), [1])
    with pytest.raises(ValueError, match="together"):
        Sample([1], [2], pixel_values=torch.zeros(4, 6))
    with pytest.raises(ValueError, match="mm_token_type_ids"):
        Sample([1, 9, 9], [2], pixel_values=torch.zeros(4, 6), image_grid_thw=[[1, 2, 2]])
    with pytest.raises(ValueError, match="pixel_values must be"):
        Sample([1, 9], [2], pixel_values=torch.zeros(3, 6), image_grid_thw=[[1, 2, 2]], mm_token_type_ids=[0, 1])
    with pytest.raises(ValueError, match="response_mask"):
        Sample([1], [2, 3], response_mask=[1.0])
    with pytest.raises(ValueError, match="rope_index"):
        pack_samples([Sample([1, 9], [2], pixel_values=torch.zeros(4, 6), image_grid_thw=[[1, 2, 2]],
                             mm_token_type_ids=[0, 1])])
    with pytest.raises(TypeError, match="samples\\[0\\]"):
        pack_samples([([1], [2])])


def test_dummy_batch_and_to():
    d = dummy_batch(vision_language=True, token_id=3)
    assert d.is_dummy and d.num_tokens == 2 and d.position_ids.shape == (4, 1, 2)
    assert d.loss_mask.tolist() == [0.0] and d.targets.tolist() == [3]
    assert torch.equal(d.gather_response([]), torch.zeros(1)) and torch.equal(d.gather_sequences([]), torch.zeros(1))
    assert dummy_batch(vision_language=False).position_ids.shape == (1, 2)
    moved = d.to("meta")
    assert isinstance(moved, PackedBatch) and moved.is_dummy and moved.max_seqlen == d.max_seqlen
    assert all(getattr(moved, name).device.type == "meta"
               for name in ("input_ids", "position_ids", "cu_seqlens", "target_positions", "loss_mask"))
    assert d.input_ids.device.type == "cpu"  # the original is untouched


def vl_samples(processor, rng, specs):
    """specs: list of (image sizes, text, response length); real processor output, like the rollout engine's."""
    import numpy as np
    from PIL import Image

    samples = []
    for sizes, text, n_resp in specs:
        images = [Image.fromarray(np.asarray(rng.integers(0, 255, (h, w, 3)), dtype=np.uint8)) for h, w in sizes]
        content = [{"type": "image"}] * len(images) + [{"type": "text", "text": text}]
        prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                               tokenize=False)
        enc = processor(text=[prompt], images=images or None, return_tensors="pt")
        extra = {}
        if images:
            extra = dict(pixel_values=enc["pixel_values"], image_grid_thw=enc["image_grid_thw"],
                         mm_token_type_ids=enc["mm_token_type_ids"][0])
        samples.append(Sample(enc["input_ids"][0], rng.integers(10, 1000, n_resp).tolist(), **extra))
    return samples


@pytest.fixture(scope="module")
def vl_model_and_processor(tiny_kit):
    from srpo_fast.models import load_policy
    from srpo_fast.models.processor import load_processor

    return load_policy(tiny_kit["vl"]), load_processor(tiny_kit["vl"])


def test_mrope_ids_equal_get_rope_index_of_each_full_sequence(vl_model_and_processor):
    import numpy as np

    model, processor = vl_model_and_processor
    rng = np.random.default_rng(0)
    samples = vl_samples(processor, rng, [([(56, 84)], "how many", 5), ([], "add", 3),
                                          ([(112, 112), (56, 56)], "compare", 7), ([(84, 56)], "again", 2)])
    indexer = MRopeIndexer(model)
    batch = pack_samples(samples, rope_index=indexer)
    assert batch.position_ids.shape == (4, 1, batch.num_tokens)
    for s, start, end in zip(samples, batch.cu_seqlens[:-1].tolist(), batch.cu_seqlens[1:].tolist()):
        ids = torch.cat([s.prompt_ids, s.response_ids])[None]
        if s.has_images:
            mm = torch.cat([s.mm_token_type_ids, torch.zeros(s.response_ids.numel(), dtype=torch.long)])[None]
            ref, _ = model.model.get_rope_index(ids, mm_token_type_ids=mm, image_grid_thw=s.image_grid_thw)
            ref = ref[:, 0]
        else:
            ref = torch.arange(ids.shape[1]).expand(3, -1)
        assert torch.equal(batch.position_ids[1:, 0, start:end], ref)
        assert batch.position_ids[0, 0, start:end].tolist() == list(range(end - start))
    # image tensors concatenated in row order; mm types mark exactly the image tokens
    with_images = [s for s in samples if s.has_images]
    assert torch.equal(batch.pixel_values, torch.cat([s.pixel_values for s in with_images]))
    assert torch.equal(batch.image_grid_thw, torch.cat([s.image_grid_thw for s in with_images]))
    image_token = model.config.image_token_id
    assert torch.equal(batch.mm_token_type_ids[0], (batch.input_ids[0] == image_token).long())
    # the prompt's ids are computed once for the samples of a group (same prompt, other responses)
    group = [Sample(samples[0].prompt_ids, [5] * n, pixel_values=samples[0].pixel_values,
                    image_grid_thw=samples[0].image_grid_thw, mm_token_type_ids=samples[0].mm_token_type_ids)
             for n in (1, 4)]
    calls = []
    original = indexer._get_rope_index
    indexer._get_rope_index = lambda **kw: calls.append(1) or original(**kw)
    fresh = MRopeIndexer(model)
    fresh._get_rope_index = indexer._get_rope_index
    out = [fresh(s) for s in group]
    assert len(calls) == 1 and torch.equal(out[1][:, :out[0].shape[1]], out[0])
    too_few = samples[0].mm_token_type_ids.clone()
    too_few[int(too_few.argmax())] = 0  # one image token marked as text
    bad = Sample(samples[0].prompt_ids, [5], pixel_values=samples[0].pixel_values,
                 image_grid_thw=samples[0].image_grid_thw, mm_token_type_ids=too_few)
    with pytest.raises(ValueError, match="image tokens"):
        fresh(bad)
