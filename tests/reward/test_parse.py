"""Response structure parsing (srpo_fast.reward.parse) against hand-written expectations."""
import re
import time

import pytest

from srpo_fast.reward.parse import parse_response

FULL = "<think>T1</think><answer>A1</answer><reflection>R</reflection><think>T2</think><answer>A2</answer>"

# (response, structure, well_formed (paper format), strict (official format), reflection_nonempty)
STRUCTURE_CASES = [
    ("", "none", False, False, False),
    ("just text, no tags", "none", False, False, False),
    ("<think>T1</think><answer>A1</answer>", "first", True, False, False),
    ("  <think>T1</think>\n<answer>A1</answer>\n ", "first", True, False, False),
    (FULL, "full", True, True, True),
    ("\n" + FULL.replace("</answer><", "</answer>\n\n<") + "\n", "full", True, True, True),
    ("Sure! " + FULL, "full", False, True, True),  # text before: not paper-clean, official allows it
    (FULL + " bye", "full", False, False, True),  # text after the last </answer>
    (FULL.replace("</answer><reflection>", "</answer>so<reflection>"), "full", False, False, True),
    (FULL.replace("<reflection>R</reflection>", "<reflection> </reflection>"), "full", False, False, False),
    (FULL.replace("<think>T2</think>", "<think></think>"), "full", False, False, True),
    ("<think></think><answer>A1</answer>", "first", False, False, False),
    ("<think>T1</think><answer>  \n</answer>", "first", False, False, False),
    ("<answer>A1</answer><think>T1</think>", "malformed", False, False, False),  # wrong order
    ("<think>T1</think>", "malformed", False, False, False),  # think alone
    ("<think>T1</think><answer>A1</answer><answer>A1</answer>", "malformed", False, False, False),  # duplicate
    ("<think>T1<think>x</think></think><answer>A1</answer>", "malformed", False, False, False),  # nested
    ("<think>T1</think><answer>A1", "malformed", False, False, False),  # unclosed
    ("<think>T1</answer><answer>A1</answer>", "malformed", False, False, False),  # mismatched close
    ("</think><think>T1</think><answer>A1</answer>", "malformed", False, False, False),  # stray close
    (FULL + "<reflection>again</reflection>", "malformed", False, False, False),  # six blocks
    ("<THINK>T1</THINK><answer>A1</answer>", "malformed", False, False, False),  # tags are case-sensitive
    ("<think>ünïcødé 数学 🙂</think><answer>π≈3.14</answer>", "first", True, False, False),
]


@pytest.mark.parametrize("text,structure,well_formed,strict,reflection", STRUCTURE_CASES)
def test_structure(text, structure, well_formed, strict, reflection):
    p = parse_response(text)
    assert (p.structure, p.well_formed, p.strict, p.reflection_nonempty) == (structure, well_formed, strict,
                                                                              reflection)


def _findall(tag, text):
    return re.findall(rf"<{tag}>(.*?)</{tag}>", text, re.DOTALL)


# the lenient fields follow re.findall(r"<tag>(.*?)</tag>", DOTALL), which is what the released reward uses
LENIENT_CASES = [
    FULL,
    "pre <think> a </think> mid <answer> 4 </answer> post",
    "<answer>x<answer>y</answer>z</answer><answer>w</answer>",
    "<think>a</think><think>b</think><answer>1</answer><answer>2</answer><answer>3</answer>",
    "<answer>unclosed <think>t</think>",
    "</answer><answer></answer>",
    "<think>t</think><answer>\\boxed{5}</answer><reflection>r</reflection><answer>6</answer>",
]


@pytest.mark.parametrize("text", LENIENT_CASES)
def test_lenient_fields_match_findall(text):
    p = parse_response(text)
    thinks, answers = _findall("think", text), _findall("answer", text)
    assert p.n_think == len(thinks) and p.n_answer == len(answers)
    assert p.first_think == (thinks[0].strip() if thinks else None)
    assert p.first_answer == (answers[0].strip() if answers else None)
    assert p.last_answer == (answers[-1].strip() if len(answers) >= 2 else None)


def test_full_fields():
    p = parse_response(" <think> step one </think> <answer> \\boxed{4} </answer> <reflection> check </reflection>"
                       " <think> step two </think> <answer> 5 </answer> ")
    assert p.structure == "full" and p.well_formed and p.strict
    assert (p.first_think, p.first_answer, p.last_answer) == ("step one", "\\boxed{4}", "5")


def test_rejects_non_str():
    with pytest.raises(TypeError, match="response must be str"):
        parse_response(b"<think>x</think>")


# name → (text of about 1 MB, structure, n_think, n_answer)
ADVERSARIAL_1MB = {
    "open think repeated": ("<think>" * 150_000, "malformed", 0, 0),
    "open answer repeated": ("<answer>" * 130_000, "malformed", 0, 0),
    "alternating opens": ("<think><answer>" * 70_000, "malformed", 0, 0),
    "closes only": ("</reflection>" * 80_000, "malformed", 0, 0),
    "unclosed think, long body": ("<think>" + "a" * 1_000_000, "malformed", 0, 0),
    "nested pairs": ("<think>" * 70_000 + "x" + "</think>" * 70_000, "malformed", 1, 0),
    "near-miss tags": ("<thin<answe<reflectio</thin" * 40_000, "none", 0, 0),
    "full then junk": (FULL + "<" * 1_000_000, "full", 2, 2),
}


@pytest.mark.parametrize("name", sorted(ADVERSARIAL_1MB))
def test_adversarial_inputs_parse_in_linear_time(name):
    """A loose guard against quadratic blow-up (a backtracking regex takes minutes here), not a perf target."""
    text, structure, n_think, n_answer = ADVERSARIAL_1MB[name]
    assert len(text) >= 900_000
    t0 = time.perf_counter()
    p = parse_response(text)
    elapsed = time.perf_counter() - t0
    assert elapsed < 2.0, f"{name}: {elapsed:.2f} s"
    assert (p.structure, p.n_think, p.n_answer) == (structure, n_think, n_answer)
    assert not p.well_formed and not p.strict
