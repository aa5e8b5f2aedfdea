"""Eval scorers per benchmark on hand-built rows in each dataset's Hugging Face layout: right/wrong, letters vs
option text, precision, units, boxed or not, SRPO fixes and breaks, unparsable → wrong (never a random letter),
odd and huge text never raising; row layouts → prompt text with one <image> per image."""
from __future__ import annotations

import io
import subprocess
import sys
import time

import pytest
from PIL import Image

from srpo_fast.eval import RowError, score_item, to_item
from srpo_fast.eval.scoring import extract_answers
from srpo_fast.reward.config import RewardConfig


def png(color=(200, 0, 0)) -> dict:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 24), color).save(buffer, "PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def srpo(first: str, final: str) -> str:
    return (f"<think>solve</think><answer>{first}</answer><reflection>check the step again</reflection>"
            f"<think>redo</think><answer>{final}</answer>")


def one(answer: str) -> str:
    return f"<think>solve</think><answer>{answer}</answer>"


def verdict(benchmark, row, response):
    return score_item(benchmark, row, response).final_correct


# ---------------------------------------------------------------- MathVista

def mathvista_row(**kw) -> dict:
    row = dict(pid="7", question="What is the value?", image="images/7.jpg", decoded_image=png(), choices=None,
               unit=None, precision=None, answer="12", question_type="free_form", answer_type="integer",
               metadata={"task": "math word problem", "category": "math-targeted-vqa"},
               query="Hint: Please answer the question requiring an integer answer.\nQuestion: What is the value?")
    row.update(kw)
    return row


MV_CHOICE = mathvista_row(
    pid="21", question="The derivative at x=2 is ____ that at x=5", choices=["larger than", "equal to", "smaller than"],
    answer="equal to", question_type="multi_choice", answer_type="text",
    query="Hint: answer with the option letter.\nQuestion: The derivative at x=2 is ____ that at x=5\nChoices:\n"
          "(A) larger than\n(B) equal to\n(C) smaller than")


@pytest.mark.parametrize("response,correct,choice", [
    (one("B"), True, "B"),
    (one("(B)"), True, "B"),
    (one("\\boxed{B}"), True, "B"),
    (one("equal to"), True, "B"),  # option text → its letter
    (one("The answer is: equal to."), True, "B"),
    (one("(A) larger than"), False, "A"),
    (one("smaller than"), False, "C"),
    ("I think it is the same slope, so the answer is (B).", True, "B"),  # free text: the last line
    (one("D"), False, None),  # not an option letter here
    (one("I do not know"), False, None),
])
def test_mathvista_multiple_choice(response, correct, choice):
    res = score_item("mathvista", MV_CHOICE, response)
    assert (res.final_correct, res.choice, res.gold) == (correct, choice, "B")
    assert res.first_correct is None and not res.reflection


@pytest.mark.parametrize("response,correct", [
    (one("1.45"), True), (one("1.449"), True), (one("\\boxed{1.4512}"), True), (one("1.46"), False),
    (one("1.4"), False), (one("about one"), False),
])
def test_mathvista_float_rounds_to_precision(response, correct):
    row = mathvista_row(answer="1.45", answer_type="float", precision=2.0)
    assert verdict("mathvista", row, response) is correct


def test_mathvista_precision_one_and_integer_is_exact():
    assert verdict("mathvista", mathvista_row(answer="0.6", answer_type="float", precision=1.0), one("0.58"))
    # 0.66 rounds to 0.7
    assert not verdict("mathvista", mathvista_row(answer="0.6", answer_type="float", precision=1.0), one("0.66"))
    assert not verdict("mathvista", mathvista_row(answer="3"), one("3.4"))  # an integer is not rounded to match
    assert verdict("mathvista", mathvista_row(answer="3"), one("3.0"))


@pytest.mark.parametrize("response,correct", [
    (one("12 cm"), True), (one("12cm"), True), (one("\\boxed{12}"), True), (one("12"), True),
    (one("13 cm"), False), (one("twelve"), False),
])
def test_mathvista_units(response, correct):
    assert verdict("mathvista", mathvista_row(unit="cm"), response) is correct


def test_mathvista_list_and_text_answers():
    row = mathvista_row(answer="[2, 5]", answer_type="list")
    assert verdict("mathvista", row, one("[2, 5]")) and verdict("mathvista", row, one("2, 5"))
    assert not verdict("mathvista", row, one("[5, 2]")) and not verdict("mathvista", row, one("[2, 5, 7]"))
    text_row = mathvista_row(answer="Tuesday", answer_type="text")
    assert verdict("mathvista", text_row, one("tuesday")) and not verdict("mathvista", text_row, one("Monday"))


def test_srpo_format_fix_and_break():
    fix = score_item("mathvista", mathvista_row(), srpo("13", "\\boxed{12}"))
    assert (fix.first_correct, fix.final_correct, fix.reflection) == (False, True, True)
    assert (fix.first_extracted, fix.extracted, fix.structure) == ("13", "12", "full")
    brk = score_item("mathvista", MV_CHOICE, srpo("B", "A"))
    assert (brk.first_correct, brk.final_correct) == (True, False)
    plain = score_item("mathvista", mathvista_row(), one("12"))
    assert plain.first_correct is None and plain.final_correct and plain.first_or_final_correct


def test_extraction_fallbacks():
    assert extract_answers("work... so \\boxed{7} and more text").final == "7"
    ext = extract_answers("<think>long</think>\nFinal: 42\n\n")
    assert (ext.final, ext.source) == ("Final: 42", "tail")
    assert extract_answers("<answer></answer> then \\boxed{3}").final == "3"  # empty block: fall back
    assert extract_answers("").source == "empty" and extract_answers("<think></think>").final == ""
    long_line = "y" * 10_000
    assert len(extract_answers(long_line).final) == 500


def test_mathvista_prompt_and_images():
    item = to_item("mathvista", MV_CHOICE)
    assert item.problem.startswith("<image>\nHint:") and item.problem.count("<image>") == 1
    assert item.letters == "ABC" and item.options == MV_CHOICE["choices"]
    assert item.categories == {"question_type": "multi_choice", "answer_type": "text", "task": "math word problem"}
    images = item.load_images()
    assert len(images) == 1 and images[0].size == (32, 24) and images[0].mode == "RGB"
    # no decoded_image: the path field, relative to the data file's directory
    item = to_item("mathvista", mathvista_row(decoded_image=None, image="missing/7.jpg"), base="/nonexistent")
    with pytest.raises(RowError, match="image not found"):
        item.load_images()


# ---------------------------------------------------------------- MathVerse

def mathverse_row(**kw) -> dict:
    row = dict(sample_index="12", problem_index="3", problem_version="Text Dominant",
               question="As shown in the figure, find angle ABC.\nChoices:\nA:30°\nB:45°\nC:60°\nD:90°",
               image=png(), answer="C", question_type="multi-choice",
               metadata={"split": "testmini", "source": "GeoQA", "subject": "Plane Geometry", "subfield": "Angle"},
               query_wo="Please directly answer the question and provide the correct option letter.\nQuestion: ...",
               query_cot="Please first conduct reasoning ...", question_for_eval="find angle ABC")
    row.update(kw)
    return row


@pytest.mark.parametrize("response,correct", [
    (one("C"), True), (one("60°"), True), (one("\\boxed{60^\\circ}"), True), (one("C:60°"), True),
    (one("B"), False), (one("45°"), False), (one("\\boxed{70}"), False),
])
def test_mathverse_multiple_choice(response, correct):
    assert verdict("mathverse", mathverse_row(), response) is correct


def test_mathverse_free_form_and_vision_only():
    row = mathverse_row(question="Find x.", answer="\\frac{3}{2}", question_type="free-form",
                        problem_version="Vision Only")
    assert verdict("mathverse", row, one("1.5")) and verdict("mathverse", row, one("\\dfrac{6}{4}"))
    assert not verdict("mathverse", row, one("2"))
    vision_only = mathverse_row(question="", problem_version="Vision Only")
    item = to_item("mathverse", vision_only)
    assert item.problem.startswith("<image>\nPlease directly answer") and item.letters == "ABCDEFGH"
    assert item.categories["problem_version"] == "Vision Only"
    assert verdict("mathverse", vision_only, one("C"))


def test_math_verify_decides_symbolic_answers():
    row = mathverse_row(question="Find x.", answer="2\\sqrt{3}", question_type="free-form")
    res = score_item("mathverse", row, one("\\boxed{\\sqrt{12}}"))
    assert res.final_correct and res.method == "math_verify"
    assert not score_item("mathverse", row, one("\\boxed{3\\sqrt{2}}")).final_correct
    long = score_item("mathverse", row, one("\\sqrt{12}" + " + 0" * 600))  # equal, but too long for math-verify
    assert long.method == "rule" and not long.final_correct


# ---------------------------------------------------------------- MathVision

def mathvision_row(**kw) -> dict:
    row = dict(id="101", question="How many triangles are in <image1>?", options=["1", "2", "3", "4", "5"],
               image="images/101.jpg", decoded_image=png(), answer="C", solution=None, level=2,
               subject="counting")
    row.update(kw)
    return row


def test_mathvision_choice_and_free_form():
    item = to_item("mathvision", mathvision_row())
    assert item.problem.startswith("How many triangles are in <image>?") and item.problem.count("<image>") == 1
    assert "(C) 3" in item.problem and item.categories == {"subject": "counting", "level": "2"}
    assert verdict("mathvision", mathvision_row(), one("\\boxed{C}"))
    assert verdict("mathvision", mathvision_row(), one("3"))  # option value → letter
    assert not verdict("mathvision", mathvision_row(), one("E"))
    free = mathvision_row(options=[], answer="2\\sqrt{3}", question="Find the length.")
    assert to_item("mathvision", free).problem.startswith("<image>\nFind the length.")
    assert verdict("mathvision", free, "so the length is \\boxed{2\\sqrt{3}}")  # no answer block: last boxed
    assert not verdict("mathvision", free, one("\\boxed{2\\sqrt{2}}"))


# ---------------------------------------------------------------- MMMU-Pro

MMMU_OPTIONS = ["$10", "$20", "<image 3>", "$40", "$50", "$60", "$70", "$80", "$90", "$100"]


def mmmu_row(**kw) -> dict:
    row = dict(id="validation_Economics_3", question="Compare <image 2> with <image 1>; which price holds?",
               options=repr(MMMU_OPTIONS), explanation="", image_1=png((1, 0, 0)), image_2=png((2, 0, 0)),
               image_3=png((3, 0, 0)), image_4=None, image_5=None, image_6=None, image_7=None,
               img_type="['Diagrams']", answer="D", topic_difficulty="Medium", subject="Economics")
    row.update(kw)
    return row


def test_mmmu_pro_standard_layout():
    item = to_item("mmmu_pro", mmmu_row())
    assert item.letters == "ABCDEFGHIJ" and item.options == MMMU_OPTIONS
    assert item.problem.count("<image>") == 3 and "(J) $100" in item.problem
    # images in order of first mention: image 2, image 1, then image 3 (inside option C)
    assert [im.getpixel((0, 0))[0] for im in item.load_images()] == [2, 1, 3]
    assert item.categories == {"setting": "standard", "subject": "Economics"}


@pytest.mark.parametrize("response,correct,choice", [
    (one("D"), True, "D"), (one("$40"), True, "D"), ("The correct answer is (D).", True, "D"),
    ("Answer: D", True, "D"), (one("J"), False, "J"), (one("\\boxed{\\text{D}}"), True, "D"),
])
def test_mmmu_pro_letters(response, correct, choice):
    res = score_item("mmmu_pro", mmmu_row(), response)
    assert (res.final_correct, res.choice) == (correct, choice)


@pytest.mark.parametrize("response", ["I cannot tell from the image.", one(""), one("maybe"), "",
                                      "A triangle is drawn here", one("E or F"), one("K")])
def test_mmmu_pro_unparsable_is_wrong_for_every_gold(response):
    """A scorer that picked a random option would be right for some gold letter; ours never is."""
    for gold in "ABCDEFGHIJ":
        res = score_item("mmmu_pro", mmmu_row(answer=gold), response)
        assert not res.final_correct and res.choice is None


def test_mmmu_pro_vision_config():
    row = dict(id="test_Art_1", image=png(), options=repr(MMMU_OPTIONS[:4]), answer="B", subject="Art")
    item = to_item("mmmu_pro", row)
    assert item.problem.startswith("<image>\n") and len(item.images) == 1 and item.letters == "ABCD"
    assert item.categories["setting"] == "vision"
    assert verdict("mmmu_pro", row, srpo("A", "B")) and not verdict("mmmu_pro", row, one("E"))


# ---------------------------------------------------------------- EMMA

def emma_row(**kw) -> dict:
    row = dict(pid="phy_12", question="The block in <image_1> slides; what is its speed?",
               options=["1 m/s", "2 m/s", "3 m/s", "4 m/s"], answer="B", image_1=png(), image_2=None, image_3=None,
               image_4=None, image_5=None, solution="", subject="Physics", task="mechanics", category="motion",
               source="", type="Multiple Choice", context="")
    row.update(kw)
    return row


def test_emma_choice_and_open():
    item = to_item("emma", emma_row())
    assert item.problem.startswith("The block in <image> slides") and "(D) 4 m/s" in item.problem
    assert item.categories == {"subject": "Physics", "category": "motion", "type": "Multiple Choice"}
    assert verdict("emma", emma_row(), one("\\boxed{B}")) and verdict("emma", emma_row(), one("2 m/s"))
    assert not verdict("emma", emma_row(), one("C"))
    open_row = emma_row(options=None, answer="4.5", type="Open-ended")
    assert verdict("emma", open_row, one("4.5 m")) and verdict("emma", open_row, one("\\boxed{9/2}"))
    assert not verdict("emma", open_row, one("5"))
    fix = score_item("emma", open_row, srpo("5", "4.5"))
    assert (fix.first_correct, fix.final_correct) == (False, True)


# ---------------------------------------------------------------- robustness and errors

ODD = ["", "<answer>", "</answer><answer>", "\\boxed{", "\\boxed{" * 20_000, "x" * 2_000_000, "<think>" * 50_000,
       "<answer>" + "9" * 5000 + "</answer>", "\u202e\ud800\x00 ünïcödé \n\n\t", "{" * 10_000 + "}" * 3,
       srpo("", ""), "<answer>A</answer>" * 5000, "(" * 5000 + "B"]
ROWS = {"mathvista": MV_CHOICE, "mathverse": mathverse_row(question="Find x.", answer="12", question_type="free-form"),
        "mathvision": mathvision_row(), "mmmu_pro": mmmu_row(answer="A"), "emma": emma_row(answer="A")}


@pytest.mark.parametrize("benchmark", sorted(ROWS))
def test_odd_text_never_raises(benchmark):
    config = RewardConfig(grade_timeout_s=1.0, num_workers=1)  # two items here time out
    start = time.perf_counter()
    for text in ODD:
        res = score_item(benchmark, ROWS[benchmark], text, config=config)
        assert isinstance(res.final_correct, bool) and isinstance(res.extracted, str)
    assert not score_item(benchmark, ROWS[benchmark], None).final_correct  # nothing generated
    assert time.perf_counter() - start < 20


def test_bad_rows_and_names_are_clear_errors():
    with pytest.raises(ValueError, match="unknown benchmark 'mathvista2'"):
        score_item("mathvista2", MV_CHOICE, "B")
    with pytest.raises(RowError, match="missing field 'answer'"):
        to_item("mathvista", {k: v for k, v in MV_CHOICE.items() if k != "answer"})
    with pytest.raises(RowError, match="not one of the choices"):
        to_item("mathvista", dict(MV_CHOICE, answer="bigger"))
    with pytest.raises(RowError, match="'options' is not a list"):
        to_item("mmmu_pro", mmmu_row(options="[unclosed"))
    with pytest.raises(RowError, match="option letter"):
        to_item("mmmu_pro", mmmu_row(answer="Z"))
    with pytest.raises(RowError, match="a row must be a mapping"):
        to_item("emma", ["not", "a", "row"])
    with pytest.raises(TypeError, match="must be str"):
        score_item("emma", emma_row(), 42)


def test_import_is_light():
    code = ("import sys; from srpo_fast.eval import score_item; "
            "score_item('mmmu_pro', {'id': '1', 'question': 'q', 'options': \"['a', 'b']\", 'answer': 'A'}, 'A'); "
            "print(sorted(m for m in ('torch', 'vllm', 'transformers', 'PIL') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
