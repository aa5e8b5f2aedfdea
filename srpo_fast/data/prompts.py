"""Prompt templates: a record → chat messages for the processor's chat template (images in their slots).

`srpo` asks for the five-block answer-reflect-answer format the reward scores; `r1` for plain think/answer.
"""
from __future__ import annotations

from srpo_fast.data.records import IMAGE_PLACEHOLDER

SYSTEM_PROMPTS = {
    "srpo": (
        "You are a helpful assistant. First think about the problem inside <think></think> and give your answer "
        "inside <answer></answer>. Then reflect on that solution inside <reflection></reflection>: check it, and "
        "correct or simplify it. Finally think again inside <think></think> and give your final answer inside "
        "<answer></answer>. Put a final numeric or symbolic answer in \\boxed{}; answer multiple-choice questions "
        "with the option's letter."),
    "r1": (
        "You are a helpful assistant. Think about the problem inside <think></think>, then give your answer inside "
        "<answer></answer>. Put a final numeric or symbolic answer in \\boxed{}; answer multiple-choice questions "
        "with the option's letter."),
}


def build_messages(record: dict, template: str = "srpo") -> list[dict]:
    """Chat messages with {"type": "image"} parts where the problem has `<image>` placeholders."""
    if template not in SYSTEM_PROMPTS:
        raise ValueError(f"unknown prompt template {template!r}; known: {sorted(SYSTEM_PROMPTS)}")
    pieces = record["problem"].split(IMAGE_PLACEHOLDER)
    content: list[dict] = []
    for i, text in enumerate(pieces):
        if i > 0:
            content.append({"type": "image"})
        if text.strip():
            content.append({"type": "text", "text": text.strip()})
    return [{"role": "system", "content": SYSTEM_PROMPTS[template]}, {"role": "user", "content": content}]
