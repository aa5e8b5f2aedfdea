"""score_batch with the SRPO presets: every expected value below is worked out by hand from docs/method.md.

Token counts use a counter that ignores the tags (words of the text between them), so lengths are easy to
hand-count. Unless a case says otherwise: T1 = "a b c" and A1 = "4" give ℓ1 = 4, T_target = 8, T_max = 10, and
R = "r s", T2 = "d", A2 = "4" give L = 3 + 1 + 2 + 1 + 1 = 8, so x = 0 and f_len = 1.
"""
import math
import re
import time

import pytest
import torch

from srpo_fast.reward import RewardConfig, score_batch

TAG = re.compile(r"</?(?:think|answer|reflection)>")
E = math.exp
SLOW_GOLD = "9^{9^{9^{9}}}"  # sympy hangs on it (see test_reward_grade)


def words(text: str) -> int:
    return len(TAG.sub(" ", text).split())


def full(t1="a b c", a1="4", r="r s", t2="d", a2="4"):
    return (f"<think>{t1}</think><answer>{a1}</answer><reflection>{r}</reflection>"
            f"<think>{t2}</think><answer>{a2}</answer>")


def first(t1="a b c", a1="4"):
    return f"<think>{t1}</think><answer>{a1}</answer>"


TERMS = ("total", "format", "accuracy", "reflection_format", "effectiveness", "length")

# (id, response, gold, (total, format, accuracy, reflection_format, effectiveness, length))
PAPER = [
    ("full R→R", full(), "4", (1.6, 0.5, 0.5, 0.25, 0.25, 0.1)),
    ("full W→R", full(a1="5"), "4", (1.35, 0.5, 0.0, 0.25, 0.5, 0.1)),
    ("full W→W", full(a1="5", a2="6"), "4", (0.85, 0.5, 0.0, 0.25, 0.0, 0.1)),
    ("full R→W", full(a2="5"), "4", (1.1, 0.5, 0.5, 0.25, -0.25, 0.1)),
    ("first only, right", first(), "4", (1.0, 0.5, 0.5, 0, 0, 0)),
    ("first only, wrong", first(a1="5"), "4", (0.5, 0.5, 0, 0, 0, 0)),
    ("no tags", "4", "4", (0, 0, 0, 0, 0, 0)),
    ("answer block only", "<answer>4</answer>", "4", (0.5, 0, 0.5, 0, 0, 0)),
    # text before the blocks: not well-formed, but the five-block structure is present; L = 9, x = 0.5
    ("prefix text", "Sure. " + full(), "4", (1.0 + 0.1 * E(-1), 0, 0.5, 0.25, 0.25, 0.1 * E(-1))),
    # empty reflection: no format, no I_ref; L = 6, x = -1
    ("empty reflection", full(r=" "), "4", (0.75 + 0.1 * E(-2), 0, 0.5, 0, 0.25, 0.1 * E(-2))),
    # L = T_max = 10: x = 1, laplace e^(-2)
    ("length at T_max", full(r="r s t u"), "4", (1.5 + 0.1 * E(-2), 0.5, 0.5, 0.25, 0.25, 0.1 * E(-2))),
    # L = 12: x = 2, e^(-4)
    ("length beyond T_max", full(r="r s t u v w"), "4", (1.5 + 0.1 * E(-4), 0.5, 0.5, 0.25, 0.25, 0.1 * E(-4))),
    # ℓ1 = 0 (empty first solution): no length term; A1 empty is wrong; W→R
    ("empty first solution", full(t1=" ", a1=" "), "4", (0.25 + 0.5, 0, 0, 0.25, 0.5, 0)),
    # A1 has 2 words: ℓ1 = 5, T_target = 10, T_max = 12.5; L = 9, x = -0.4, laplace e^(-0.8)
    ("boxed and LaTeX", full(a1="so \\boxed{\\frac{8}{2}}", a2="\\boxed{4}"), "4",
     (1.5 + 0.1 * E(-0.8), 0.5, 0.5, 0.25, 0.25, 0.1 * E(-0.8))),
    ("letter answers", full(a1="(B)", a2="Answer: B"), "B",
     (1.5 + 0.1 * E(-1), 0.5, 0.5, 0.25, 0.25, 0.1 * E(-1))),  # A2 has 2 words: L = 9, x = 0.5
    # unparsable gold: nothing can be right under `paper`
    ("unparsable gold", full(), "\\", (0.85, 0.5, 0, 0.25, 0, 0.1)),
    # three answer blocks: malformed; A1 = "5" is wrong
    ("three answers", first(a1="5") + "<think>d</think><answer>6</answer><answer>4</answer>", "4", (0,) * 6),
]

OFFICIAL = [
    ("full R→R", full(), "4", (1.35, 0.5, 0.5, 0, 0.25, 0.1)),
    ("full W→R", full(a1="5"), "4", (1.6, 0.5, 0, 0, 1.0, 0.1)),
    ("full R→W", full(a2="5"), "4", (0.85, 0.5, 0.5, 0, -0.25, 0.1)),
    ("full W→W", full(a1="5", a2="6"), "4", (0.6, 0.5, 0, 0, 0, 0.1)),
    ("gate: first only", first(), "4", (0,) * 6),
    ("gate: one think", first() + "<answer>4</answer>", "4", (0,) * 6),
    ("gate: no tags", "4", "4", (0,) * 6),
    # two solutions without a reflection pass the gate but not the format; L = 6, x = -1, gaussian e^(-1)
    ("no reflection", first() + first(t1="d"), "4", (0.75 + 0.1 * E(-1), 0, 0.5, 0, 0.25, 0.1 * E(-1))),
    # text before the first <think> is allowed by the released format regex; L = 9, x = 0.5
    ("prefix text", "Sure. " + full(), "4", (1.25 + 0.1 * E(-0.25), 0.5, 0.5, 0, 0.25, 0.1 * E(-0.25))),
    ("suffix text", full() + " Done", "4", (0.75 + 0.1 * E(-0.25), 0, 0.5, 0, 0.25, 0.1 * E(-0.25))),
    ("length at T_max", full(r="r s t u"), "4", (1.25 + 0.1 * E(-1), 0.5, 0.5, 0, 0.25, 0.1 * E(-1))),
    ("length beyond T_max", full(r="r s t u v w"), "4", (1.25 + 0.1 * E(-4), 0.5, 0.5, 0, 0.25, 0.1 * E(-4))),
    # an unparsable gold gives the merged term 1.0, whatever the answers
    ("unparsable gold (math-verify)", full(), "\\", (1.6, 0.5, 1.0, 0, 0, 0.1)),
    ("unparsable gold (empty)", full(a1="5", a2="6"), "", (1.6, 0.5, 1.0, 0, 0, 0.1)),
    ("unparsable gold behind the gate", first(), "", (0,) * 6),
    # three answers: A1 the first, A2 the last → W→R; L = 7, x = -0.5
    ("three answers", first(a1="5") + "<think>d</think><answer>6</answer><answer>4</answer>", "4",
     (1.0 + 0.1 * E(-0.25), 0, 0, 0, 1.0, 0.1 * E(-0.25))),
]

R1 = [
    ("first only, right", first(), "4", (1.0, 0.5, 0.5, 0, 0, 0)),
    ("first only, wrong", first(a1="5"), "4", (0.5, 0.5, 0, 0, 0, 0)),
    ("full: not the R1 format", full(), "4", (0.5, 0, 0.5, 0, 0, 0)),
    ("no tags", "4", "4", (0,) * 6),
]


def _check(out, rows, atol=1e-6):
    for name in TERMS:
        got = getattr(out, name)
        assert got.dtype == torch.float32 and got.shape == (len(rows),)
        want = torch.tensor([row[3][TERMS.index(name)] for row in rows], dtype=torch.float32)
        for (case, *_), g, w in zip(rows, got.tolist(), want.tolist()):
            assert g == pytest.approx(w, abs=atol), f"{case}: {name} = {g}, expected {w}"


@pytest.mark.parametrize("preset,rows", [("paper", PAPER), ("official", OFFICIAL), ("r1", R1)])
def test_preset_table(preset, rows):
    out = score_batch([r[1] for r in rows], [r[2] for r in rows], RewardConfig(preset=preset), words)
    _check(out, rows)
    assert out.timeouts == 0 and out.crashes == 0
    assert out.first_correct.dtype == torch.bool and out.second_correct.dtype == torch.bool


def test_correctness_flags():
    responses = [full(), full(a1="5"), full(a2="5"), first(), "<answer>4</answer>"]
    out = score_batch(responses, ["4"] * 5, RewardConfig(preset="paper"), words)
    assert out.first_correct.tolist() == [True, False, True, True, True]
    assert out.second_correct.tolist() == [True, True, False, False, False]
    assert out.has_reflection.tolist() == [True, True, True, False, False]


def test_official_letter_fallback():
    # T1 has 7 words, A1 1: ℓ1 = 8, T_target = 16; R 1 + T2 1 + A2 6 words: L = 16, x = 0
    a2 = "I am sure it is C"
    response = full(t1="a b c d e f g", a1="A", r="hmm", a2=a2)
    options = ["1", "2", "3", "4"]
    cfg = RewardConfig(preset="official")
    with_options = score_batch([response], ["C"], cfg, words, options=[options])
    # the strict grader finds no letter in A2 (W→W), the fallback finds "C" alone among the options A–D
    assert not with_options.second_correct.item()
    assert with_options.total.item() == pytest.approx(0.5 + 1.0 + 0.1)
    assert with_options.effectiveness.item() == pytest.approx(1.0)
    # without options, "I" is a choice letter too: two letters, no fallback
    assert score_batch([response], ["C"], cfg, words).total.item() == pytest.approx(0.5 + 0.1)
    off = RewardConfig(preset="official", letter_fallback=False)
    assert score_batch([response], ["C"], off, words, options=[options]).total.item() == pytest.approx(0.6)
    # not under `paper`: W→W there
    assert score_batch([response], ["C"], RewardConfig(preset="paper"), words,
                       options=[options]).effectiveness.item() == 0.0


def test_multiple_choice_option_text():
    out = score_batch([full(a1="42", a2="(B)")], ["B"], RewardConfig(preset="paper"), words,
                      options=[["41", "42", "43"]])
    assert out.first_correct.item() and out.second_correct.item()


# paper R→R at T_target is 0.5 + 0.5 + 0.25 + 0.25 + 0.1 = 1.6; each switch removes its own term
@pytest.mark.parametrize("switches,total", [
    ({}, 1.6),
    ({"effectiveness": False}, 1.35),  # ablation: no I_eff
    ({"length": False}, 1.5),  # ablation: no f_len
    ({"reflection_format": False, "effectiveness": False, "length": False}, 1.0),  # plain GRPO
    ({"format": False}, 1.1),
    ({"accuracy": False}, 1.1),
    ({"length_alpha": 0.3}, 1.8),
])
def test_switches(switches, total):
    out = score_batch([full()], ["4"], RewardConfig(preset="paper", **switches), words)
    assert out.total.item() == pytest.approx(total)
    for name in ("format", "accuracy", "reflection_format", "effectiveness", "length"):
        if switches.get(name) is False:
            assert getattr(out, name).item() == 0.0


def test_official_switches_split_the_merged_term():
    # W→R under official: accuracy 0, effectiveness 1.0
    cfg = RewardConfig(preset="official", effectiveness=False)
    assert score_batch([full(a1="5")], ["4"], cfg, words).total.item() == pytest.approx(0.6)
    cfg = RewardConfig(preset="official", accuracy=False)
    assert score_batch([full()], ["4"], cfg, words).total.item() == pytest.approx(0.5 + 0.25 + 0.1)


@pytest.mark.parametrize("preset,shape,reflection,expected", [
    ("paper", "gaussian", "r s t u", 0.1 * E(-1)),  # x = 1
    ("official", "laplace", "r s t u", 0.1 * E(-2)),
    ("paper", None, "r", 0.1 * E(-1)),  # L = 7: x = -0.5, laplace e^(-1)
    ("official", None, "r", 0.1 * E(-0.25)),  # gaussian e^(-0.25)
])
def test_length_shapes(preset, shape, reflection, expected):
    cfg = RewardConfig(preset=preset, length_shape=shape)
    assert score_batch([full(r=reflection)], ["4"], cfg, words).length.item() == pytest.approx(expected)


def test_length_ratios():
    # T_target = 1·4, T_max = 3·4: L = 8 gives x = (8 - 4) / 8 = 0.5, laplace e^(-1)
    cfg = RewardConfig(preset="paper", target_ratio=1.0, max_ratio=3.0)
    assert score_batch([full()], ["4"], cfg, words).length.item() == pytest.approx(0.1 * E(-1))


def test_default_token_count_is_whitespace_words():
    # with spaces around the tags, each tag is a word: ℓ1 = 14 + 1 (tags excluded: contents are stripped),
    # T_target = 30; L = 15 + 3 + 1 + 1 + 10 tags = 30 → f = 1
    t1 = " ".join("w" * 14)
    response = (f"<think> {t1} </think> <answer> 4 </answer> <reflection> r s t </reflection> "
                f"<think> d </think> <answer> 4 </answer>")
    assert score_batch([response], ["4"]).length.item() == pytest.approx(0.1)


def test_count_tokens_must_return_int():
    with pytest.raises(TypeError, match="count_tokens must return ints"):
        score_batch([full()], ["4"], RewardConfig(), lambda s: float(len(s)))


def test_batched_count_and_known_lengths():
    responses = [full(), full(r="r s t u"), first(), "junk"]
    expected = [0.1, 0.1 * E(-2), 0.0, 0.0]  # only full structures are counted (paper)
    calls = []

    def batch(texts):
        calls.append(list(texts))
        return [words(t) for t in texts]

    out = score_batch(responses, ["4"] * 4, RewardConfig(), count_tokens_batch=batch)
    assert out.length.tolist() == pytest.approx(expected)
    # one call: T1 and A1 of each full response, then the two whole responses
    assert calls == [["a b c", "4", "a b c", "4", responses[0], responses[1]]]
    # L given by the caller (e.g. sampled token ids): 10 and 12 tokens → x = 1 and 2
    out = score_batch(responses, ["4"] * 4, RewardConfig(), words, response_lengths=[10, 12, 99, 99])
    assert out.length.tolist() == pytest.approx([0.1 * E(-2), 0.1 * E(-4), 0.0, 0.0])
    with pytest.raises(ValueError, match="returned 1 counts for 6 texts"):
        score_batch(responses[:2], ["4"] * 2, RewardConfig(), count_tokens_batch=lambda texts: [1])


def test_slow_sympy_times_out_scores_zero_and_next_call_works():
    cfg = RewardConfig(preset="paper", grade_timeout_s=1.0, num_workers=2)
    t0 = time.perf_counter()
    out = score_batch([full(a1="5", a2="5"), full()], [SLOW_GOLD, "4"], cfg, words)
    assert time.perf_counter() - t0 < 8.0
    assert out.timeouts == 1  # A1 and A2 are the same (gold, answer) pair: one math-verify call
    assert out.accuracy.tolist() == [0.0, 0.5] and out.effectiveness.tolist() == [0.0, 0.25]
    again = score_batch([full(a1="\\sqrt{16}")], ["4"], cfg, words)
    assert again.timeouts == 0 and again.first_correct.item()


def test_empty_batch():
    out = score_batch([], [], RewardConfig(preset="official"))
    assert out.total.shape == (0,) and out.first_correct.shape == (0,) and out.timeouts == 0


def test_device_argument():
    out = score_batch([full()], ["4"], RewardConfig(), words, device="cpu")
    assert out.total.device.type == "cpu"


@pytest.mark.gpu
def test_cuda_device():
    out = score_batch([full(), first()], ["4", "4"], RewardConfig(device="cuda"), words)
    assert out.total.device.type == "cuda" and out.first_correct.device.type == "cuda"
    assert out.total.cpu().tolist() == pytest.approx([1.6, 1.0])


@pytest.mark.parametrize("kwargs,error,match", [
    ({"responses": "text"}, TypeError, "responses must be a sequence"),
    ({"responses": [1]}, TypeError, r"responses\[0\] must be str"),
    ({"answers": ["4", "5"]}, ValueError, "differ in length"),
    ({"options": [["a"], ["b"]]}, ValueError, "options must be"),
    ({"options": [[1]]}, TypeError, r"options\[0\]\[0\] must be str"),
    ({"config": {"preset": "paper"}}, TypeError, "config must be a RewardConfig"),
    ({"count_tokens": 3}, TypeError, "count_tokens must be callable"),
    ({"count_tokens": len, "count_tokens_batch": len}, ValueError, "not both"),
    ({"response_lengths": [1, 2]}, ValueError, "response_lengths must be"),
    ({"response_lengths": [True]}, TypeError, r"response_lengths\[0\]"),
])
def test_score_batch_rejects_bad_arguments(kwargs, error, match):
    args = {"responses": [full()], "answers": ["4"], "config": RewardConfig(), **kwargs}
    with pytest.raises(error, match=match):
        score_batch(**args)


@pytest.mark.parametrize("kwargs,error,match", [
    ({"preset": "nope"}, ValueError, "preset"),
    ({"format": "yes"}, TypeError, "RewardConfig.format"),
    ({"length_shape": "cubic"}, ValueError, "length_shape"),
    ({"target_ratio": 2.5, "max_ratio": 2.5}, ValueError, "target_ratio"),
    ({"length_alpha": -1.0}, ValueError, "length_alpha"),
    ({"length_alpha": float("nan")}, TypeError, "length_alpha"),
    ({"grade_timeout_s": 0}, ValueError, "grade_timeout_s"),
    ({"num_workers": 0}, ValueError, "num_workers"),
    ({"precision": -1}, ValueError, "precision"),
    ({"choice_letters": "AAB"}, ValueError, "choice_letters"),
    ({"device": "nonsense"}, ValueError, "device"),
])
def test_config_validation(kwargs, error, match):
    with pytest.raises(error, match=match):
        RewardConfig(**kwargs)
