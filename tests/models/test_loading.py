"""models/loading.py: the three model kinds from local dirs, attention per sub-model, freezing by config (frozen
parts get no gradients), gradient checkpointing, the LM head / backbone helpers, and clear errors."""
import json

import pytest
import torch

from srpo_fast.data.packing import MRopeIndexer, Sample, pack_samples
from srpo_fast.models import (backbone, is_vision_language, load_policy, output_head, packed_token_logprobs,
                              parameter_counts, read_model_type)


def build_tiny_qwen2_vl(out_dir, reference_vl_dir, seed=0):
    """A random-init Qwen2-VL (not part of the tiny kit) with the kit's token ids and text shapes."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    ref = json.loads((reference_vl_dir / "config.json").read_text())
    ids = {k: ref[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")}
    config = Qwen2VLConfig(
        text_config=dict(vocab_size=1152, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]}),
        vision_config=dict(depth=2, embed_dim=64, hidden_size=128, num_heads=2, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        tie_word_embeddings=False, **ids)
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.3)
    model.save_pretrained(out_dir)
    return out_dir


def synthetic_vl_sample(config, gen, grids, text_before, text_after, response_len):
    """Prompt: text, then per image <vision_start> <image_pad> x (t*h*w/merge^2) <vision_end>, then text; random
    patches of the right width. grids: list of (t, h, w) in patches."""
    merge = config.vision_config.spatial_merge_size
    vis = config.vision_config
    width = vis.in_channels * vis.temporal_patch_size * vis.patch_size ** 2
    ids = torch.randint(10, 900, (text_before,), generator=gen).tolist()
    types = [0] * text_before
    for t, h, w in grids:
        n = t * h * w // merge ** 2
        ids += [config.vision_start_token_id] + [config.image_token_id] * n + [config.vision_end_token_id]
        types += [0] + [1] * n + [0]
    ids += torch.randint(10, 900, (text_after,), generator=gen).tolist()
    types += [0] * text_after
    response = torch.randint(10, 1100, (response_len,), generator=gen)
    if not grids:
        return Sample(ids, response)
    patches = sum(t * h * w for t, h, w in grids)
    return Sample(ids, response, pixel_values=torch.randn(patches, width, generator=gen),
                  image_grid_thw=torch.tensor(grids), mm_token_type_ids=types)


@pytest.fixture(scope="module")
def qwen2_vl_dir(tiny_kit, tmp_path_factory):
    return build_tiny_qwen2_vl(tmp_path_factory.mktemp("qwen2_vl"), tiny_kit["vl"])


def test_loads_each_kind_with_varlen_attention_in_the_language_model(tiny_kit, qwen2_vl_dir):
    expected = {"vl": ("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration"), "text": ("qwen2", "Qwen2ForCausalLM")}
    dirs = {"vl": tiny_kit["vl"], "text": tiny_kit["text"], "vl2": qwen2_vl_dir}
    expected["vl2"] = ("qwen2_vl", "Qwen2VLForConditionalGeneration")
    for key, path in dirs.items():
        model_type, cls = expected[key]
        assert read_model_type(path) == model_type
        model = load_policy(path)
        assert type(model).__name__ == cls and model.training and not model.config.use_cache
        assert next(model.parameters()).dtype == torch.float32
        if key == "text":
            assert not is_vision_language(model) and model.config._attn_implementation == "srpo_varlen"
        else:
            assert is_vision_language(model)
            assert model.config.text_config._attn_implementation == "srpo_varlen"
            assert model.config.vision_config._attn_implementation == "sdpa"
    sdpa_bf16 = load_policy(tiny_kit["text"], dtype="bfloat16", attn_implementation="sdpa")
    assert sdpa_bf16.config._attn_implementation == "sdpa"
    assert {p.dtype for p in sdpa_bf16.parameters()} == {torch.bfloat16}


def test_output_head_and_backbone_give_the_models_logits(tiny_kit):
    for path in (tiny_kit["text"], tiny_kit["vl"]):
        model = load_policy(path).eval()
        ids = torch.randint(10, 900, (1, 9))
        weight, bias = output_head(model)
        assert weight.shape == (1152, 128) and bias is None
        with torch.no_grad():
            hidden = backbone(model)(input_ids=ids, use_cache=False)[0]
            logits = model(input_ids=ids, use_cache=False).logits
        torch.testing.assert_close(hidden @ weight.T, logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("freeze_vision,freeze_projector", [(True, False), (True, True), (False, False)])
def test_freezing_by_config(tiny_kit, freeze_vision, freeze_projector):
    model = load_policy(tiny_kit["vl"], freeze_vision=freeze_vision, freeze_projector=freeze_projector)
    tower, merger = model.model.visual, model.model.visual.merger
    merger_ids = {id(p) for p in merger.parameters()}
    for name, param in tower.named_parameters():
        frozen = freeze_projector if id(param) in merger_ids else freeze_vision
        assert param.requires_grad is (not frozen), name
    assert all(p.requires_grad for p in model.model.language_model.parameters())
    counts = parameter_counts(model)
    assert counts.total == sum(p.numel() for p in model.parameters())
    assert counts.frozen == sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert counts.vision_trainable + counts.vision_frozen == sum(p.numel() for p in tower.parameters())
    # a backward through an image: frozen parameters get no gradient at all, trainable ones do
    gen = torch.Generator().manual_seed(0)
    sample = synthetic_vl_sample(model.config, gen, [(1, 4, 4)], 3, 4, 5)
    batch = pack_samples([sample], rope_index=MRopeIndexer(model))
    packed_token_logprobs(model, batch).sum().backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name


def test_gradient_checkpointing_gives_the_same_gradients(tiny_kit):
    gen = torch.Generator().manual_seed(1)
    samples = [Sample(torch.randint(10, 900, (n,), generator=gen), torch.randint(10, 900, (m,), generator=gen))
               for n, m in [(5, 4), (7, 3)]]
    grads = []
    for checkpointing in (False, True):
        model = load_policy(tiny_kit["text"], gradient_checkpointing=checkpointing)
        assert model.is_gradient_checkpointing is checkpointing
        packed_token_logprobs(model, pack_samples(samples)).sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=0, atol=1e-6)


def test_loading_errors(tmp_path, tiny_kit):
    with pytest.raises(FileNotFoundError, match="model dir not found"):
        load_policy(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_policy(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="unsupported model_type 'llama'.*qwen2_5_vl, qwen2_vl, qwen2"):
        load_policy(tmp_path)
    with pytest.raises(TypeError, match="dtype"):
        load_policy(tiny_kit["text"], dtype="float8")
    with pytest.raises(TypeError, match="dtype"):
        load_policy(tiny_kit["text"], dtype=torch.int64)
    with pytest.raises(TypeError, match="attn_implementation"):
        load_policy(tiny_kit["text"], attn_implementation={"text_config": "sdpa"})
