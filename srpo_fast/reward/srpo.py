"""The SRPO rewards (docs/method.md) and the R1-style baseline, composed as tensor ops on the target device.

Per response, Python only parses text and grades answers; the results become one [B, F] float tensor that is
moved to the device once, and every term of every response is computed there with torch ops.

`paper` (the paper's formula): format 0.5 (well-formed first solution, optionally followed by one reflection
and second solution, nothing else), accuracy 0.5·[A1 right], and with the full five-block structure: I_ref 0.25
(non-empty reflection), I_eff (W→R +0.5, R→R +0.25, W→W 0, R→W −0.25), length α·f_len. "Full structure" means
the tags form exactly think, answer, reflection, think, answer (text outside the blocks costs the format term
only). A1 is the first answer block even in a malformed response: accuracy is a term of its own.

`official` (the released OpenRLHF reward without its crashes): a response without two think and two answer
blocks scores 0; accuracy and effectiveness form one merged term (W→R 1.0, R→R 0.75, R→W 0.25, W→W 0, +1.0 by
the letter fallback, 1.0 for an unparsable gold) which we report split as accuracy = 0.5·[A1 right] (1.0 for
an unparsable gold) and effectiveness = the rest (W→R 1.0, R→R 0.25, R→W −0.25, fallback 1.0), so that each
switch removes one part; format 0.5 for the strict five-block layout; length 0.1·e^(−x²). A1 is the first
answer block, A2 the last (the released code's findall[0] and findall[-1]).

`r1`: format 0.5 for exactly ``<think>…</think><answer>…</answer>`` (non-empty, nothing else) + accuracy
0.5·[A1 right] — the paper's task reward without the reflection terms.

Length: x = (L − target_ratio·ℓ1) / ((max_ratio − target_ratio)·ℓ1), L = tokens of the whole response,
ℓ1 = tokens of the first think + first answer contents; ℓ1 = 0 gives 0. ``laplace``: e^(−2|x|) (the paper's
(e^(−|x|))² read literally), ``gaussian``: e^(−x²).
"""
from __future__ import annotations

import operator
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from srpo_fast.reward.config import RewardConfig
from srpo_fast.reward.grade import grade_batch, letter_fallback
from srpo_fast.reward.parse import ParsedResponse, parse_response

# I_eff by (A1 right, A2 right), indexed 2·c1 + c2: W→W, W→R, R→W, R→R
PAPER_EFFECTIVENESS = (0.0, 0.5, -0.25, 0.25)
OFFICIAL_EFFECTIVENESS = (0.0, 1.0, -0.25, 0.25)  # plus accuracy 0.5·c1 gives the merged 0, 1.0, 0.25, 0.75

# columns of the feature tensor built on the host
_COLUMNS = ("first", "full", "well_formed", "strict", "reflection_nonempty", "second", "c1", "c2",
            "gold_unparsable", "fallback", "length_total", "length_first")


@dataclass
class RewardOutput:
    """Per-response reward terms ([B] float32) and grading facts ([B] bool) on one device."""

    total: torch.Tensor
    format: torch.Tensor
    accuracy: torch.Tensor
    reflection_format: torch.Tensor
    effectiveness: torch.Tensor
    length: torch.Tensor
    first_correct: torch.Tensor
    second_correct: torch.Tensor  # False where the preset saw no second answer
    has_reflection: torch.Tensor  # the preset saw a reflection and second answer (paper: full structure)
    timeouts: int = 0  # math-verify calls killed at grade_timeout_s (scored wrong)
    crashes: int = 0  # grader processes that died mid-item (scored wrong)
    stats: dict[str, float] = field(default_factory=dict)  # counts and seconds per phase, for logs


def default_count_tokens(text: str) -> int:
    """Whitespace-separated words; the trainer passes the tokenizer's count instead."""
    return len(text.split())


def _counts(texts: list[str], count_tokens: Callable[[str], int] | None,
            count_tokens_batch: Callable[[list[str]], Sequence[int]] | None) -> list[int]:
    """Token counts of ``texts`` through whichever counter was given, checked to be ints."""
    if not texts:
        return []
    if count_tokens_batch is not None:
        counts = list(count_tokens_batch(texts))
        if len(counts) != len(texts):
            raise ValueError(f"count_tokens_batch returned {len(counts)} counts for {len(texts)} texts")
        name = "count_tokens_batch"
    else:
        counts = [(count_tokens or default_count_tokens)(t) for t in texts]
        name = "count_tokens"
    for n in counts:
        if isinstance(n, bool) or not hasattr(n, "__index__"):
            raise TypeError(f"{name} must return ints, got {type(n).__name__}")
    return [operator.index(n) for n in counts]


def _length_factor(total: torch.Tensor, first: torch.Tensor, config: RewardConfig) -> torch.Tensor:
    """f_len(x) with x = (L − T_target)/(T_max − T_target); 0 where ℓ1 = 0."""
    positive = first > 0
    safe = torch.where(positive, first, torch.ones_like(first))
    x = (total - config.target_ratio * safe) / ((config.max_ratio - config.target_ratio) * safe)
    f = torch.exp(-2.0 * x.abs()) if config.resolved_length_shape == "laplace" else torch.exp(-x * x)
    return torch.where(positive, f, torch.zeros_like(f))


def _table(values: Sequence[float], c1: torch.Tensor, c2: torch.Tensor) -> torch.Tensor:
    table = torch.tensor(values, dtype=torch.float32, device=c1.device)
    return table[(c1.long() << 1) | c2.long()]


def compose(preset: str, cols: dict[str, torch.Tensor], config: RewardConfig) -> dict[str, torch.Tensor]:
    """All terms of one preset from the feature columns (float 0/1 flags and token counts), no host sync."""
    c1, c2 = cols["c1"] > 0, cols["c2"] > 0
    zero = torch.zeros_like(cols["c1"])
    if preset == "srpo_paper":
        full = cols["full"]
        terms = {
            "format": 0.5 * cols["well_formed"],
            "accuracy": 0.5 * cols["c1"],
            "reflection_format": 0.25 * full * cols["reflection_nonempty"],
            "effectiveness": full * _table(PAPER_EFFECTIVENESS, c1, c2),
            "length": config.length_alpha * full * _length_factor(cols["length_total"], cols["length_first"], config),
        }
    elif preset == "srpo_official":
        gate, unparsable = cols["second"], cols["gold_unparsable"]  # second answer graded ⇔ the gate passed
        effect = _table(OFFICIAL_EFFECTIVENESS, c1, c2) + cols["fallback"] * (~c1 & ~c2)
        terms = {
            "format": 0.5 * cols["strict"],
            "accuracy": gate * torch.where(unparsable > 0, 1.0, 0.5 * cols["c1"]),
            "reflection_format": zero,
            "effectiveness": gate * (1.0 - unparsable) * effect,
            "length": config.length_alpha * gate * _length_factor(cols["length_total"], cols["length_first"],
                                                                  config),
        }
    elif preset == "r1":
        terms = {"format": 0.5 * cols["first"] * cols["well_formed"], "accuracy": 0.5 * cols["c1"],
                 "reflection_format": zero, "effectiveness": zero, "length": zero}
    else:
        raise ValueError(f"compose: unknown preset {preset!r}")
    return {name: term if getattr(config, name) else zero for name, term in terms.items()}


def score_preset(preset: str, responses: Sequence[str], answers: Sequence[str], *, config: RewardConfig,
                 count_tokens: Callable[[str], int] | None = None,
                 count_tokens_batch: Callable[[list[str]], Sequence[int]] | None = None,
                 response_lengths: Sequence[int] | None = None,
                 options: Sequence[Sequence[str] | None] | None = None,
                 device: torch.device | str | None = None) -> RewardOutput:
    """All terms of one built-in preset ("srpo_paper", "srpo_official", "r1") for a checked batch."""
    device = torch.device(device if device is not None else (config.device or "cpu"))
    n = len(responses)
    t0 = time.perf_counter()
    parsed: list[ParsedResponse] = [parse_response(r) for r in responses]
    if preset == "srpo_paper":
        second = [p.structure == "full" for p in parsed]
    elif preset == "srpo_official":
        second = [p.n_think >= 2 and p.n_answer >= 2 for p in parsed]
    else:
        second = [False] * n
    t1 = time.perf_counter()

    preds = [p.first_answer for p in parsed] + [p.last_answer if s else None for p, s in zip(parsed, second)]
    grades = grade_batch(preds, [*answers, *answers], None if options is None else [*options, *options], config,
                         check_gold=preset == "srpo_official")
    c1, c2 = grades.correct[:n], grades.correct[n:]
    t2 = time.perf_counter()

    # lengths only where the length term can be non-zero; one batched count for all texts
    measured = [i for i in range(n) if second[i]] if config.length and preset != "r1" else []
    texts = [t for i in measured for t in (parsed[i].first_think or "", parsed[i].first_answer or "")]
    if response_lengths is None:
        texts += [responses[i] for i in measured]
    counts = _counts(texts, count_tokens, count_tokens_batch)
    total_len, first_len = [0] * n, [0] * n
    for k, i in enumerate(measured):
        first_len[i] = counts[2 * k] + counts[2 * k + 1]
        total_len[i] = response_lengths[i] if response_lengths is not None else counts[2 * len(measured) + k]

    use_fallback = preset == "srpo_official" and config.letter_fallback
    rows = []
    for i, (p, s) in enumerate(zip(parsed, second)):
        fallback = (use_fallback and s and not c1[i] and not c2[i]
                    and letter_fallback(p.last_answer, answers[i], options[i] if options else None,
                                        config.choice_letters))
        rows.append((p.structure == "first", p.structure == "full", p.well_formed, p.strict,
                     p.reflection_nonempty, s, c1[i], c2[i], grades.gold_unparsable[i], fallback,
                     total_len[i], first_len[i]))
    features = torch.tensor(rows, dtype=torch.float32).reshape(n, len(_COLUMNS)).to(device)
    t3 = time.perf_counter()

    cols = dict(zip(_COLUMNS, features.unbind(1)))
    terms = compose(preset, cols, config)
    total = terms["format"] + terms["accuracy"] + terms["reflection_format"] + terms["effectiveness"] + terms["length"]
    t4 = time.perf_counter()
    st = grades.stats
    stats = {"items": n, "graded": st.items, "fast_path": st.fast, "math_verify_items": st.math_verify_items,
             "math_verify_jobs": st.math_verify_jobs, "parse_s": t1 - t0, "fast_path_s": st.fast_s,
             "math_verify_s": st.math_verify_s, "grade_s": t2 - t1, "features_s": t3 - t2, "compose_s": t4 - t3}
    return RewardOutput(total=total, **terms, first_correct=cols["c1"] > 0, second_correct=cols["c2"] > 0,
                        has_reflection=cols["second"] > 0, timeouts=st.timeouts, crashes=st.crashes, stats=stats)
