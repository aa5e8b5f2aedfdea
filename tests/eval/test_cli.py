"""`python -m srpo_fast.eval` end to end on the tiny VL kit: MathVista-layout rows in jsonl (PNG images as base64
bytes and as a file path), per-item results that agree with score_item, the report, counted skips, and a rerun
that resumes without generating again (also after a crash cut the last line short)."""
from __future__ import annotations

import base64
import io
import json
import subprocess
import sys

import pytest
from PIL import Image

from srpo_fast.eval import score_item
from srpo_fast.eval.__main__ import main


def png_bytes(color, size=(64, 48)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


def write_rows(directory) -> list[dict]:
    """Five good MathVista rows (one whose image is a file next to the data), one without an answer, and two
    whose images fail only when opened or processed."""
    (directory / "images").mkdir(parents=True)
    (directory / "images" / "5.png").write_bytes(png_bytes((0, 0, 200)))
    rows = []
    for i in range(4):
        rows.append(dict(
            pid=str(i + 1), question=f"What is {i} + 1?", image=f"images/{i + 1}.jpg",
            decoded_image={"bytes": base64.b64encode(png_bytes((40 * i, 0, 0))).decode(), "path": None},
            choices=None, unit=None, precision=None, answer=str(i + 1), question_type="free_form",
            answer_type="integer", metadata={"task": "math word problem"},
            query=f"Hint: Please answer the question requiring an integer answer.\nQuestion: What is {i} + 1?"))
    rows.append(dict(pid="5", question="Which is bigger?", image="images/5.png", decoded_image=None,
                     choices=["left", "right"], unit=None, precision=None, answer="right",
                     question_type="multi_choice", answer_type="text", metadata={"task": "figure question answering"},
                     query="Question: Which is bigger?\nChoices:\n(A) left\n(B) right"))
    # two rows that load but cannot run: bytes that are no image, and an aspect ratio the processor rejects
    for pid, data in (("7", base64.b64encode(b"not a png").decode()), ("8", base64.b64encode(
            png_bytes((9, 9, 9), size=(400, 1))).decode())):
        rows.append(dict(rows[0], pid=pid, decoded_image={"bytes": data, "path": None}))
    rows.append(dict(pid="6", question="no gold", image=None, decoded_image=None, choices=None, unit=None,
                     precision=None, answer=None, question_type="free_form", answer_type="integer", query="q"))
    with (directory / "testmini.jsonl").open("w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    return rows


def cli(tiny_kit, data, out, *extra):
    return main(["--model", str(tiny_kit["vl"]), "--benchmark", "mathvista", "--data", str(data), "--out", str(out),
                 "--max-tokens", "12", "--max-model-len", "512", "--batch-size", "4", "--no-progress", *extra])


def read_lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def check_run(tiny_kit, tmp_path, engine_args):
    data_dir = tmp_path / "data"
    rows = {r["pid"]: r for r in write_rows(data_dir)}
    out = tmp_path / "out"
    assert cli(tiny_kit, data_dir, out, *engine_args) == 0
    results = out / "mathvista.results.jsonl"
    lines = read_lines(results)
    assert sorted(line["id"] for line in lines) == ["1", "2", "3", "4", "5"]
    for line in lines:
        again = score_item("mathvista", rows[line["id"]], line["response"])
        assert (line["final_correct"], line["first_correct"], line["extracted"]) == \
            (again.final_correct, again.first_correct, again.extracted)
        assert 1 <= line["length"] <= 12 and line["length_unit"] == "tokens" and line["prompt_tokens"] > 16
    summary = json.loads((out / "mathvista.summary.json").read_text())
    assert (summary["n"], summary["items"], summary["generated"], summary["resumed"], summary["skipped"]) == \
        (5, 7, 5, 0, 3)
    reasons = summary["skip_reasons"]
    assert reasons.pop("missing field 'answer'") == 1
    assert [k.split(":")[0] for k in sorted(reasons)] == ["image", "rejected by the engine"]
    assert sorted(reasons)[0] == "image: unreadable image (UnidentifiedImageError)"
    assert "aspect ratio" in sorted(reasons)[1] and list(reasons.values()) == [1, 1]
    assert summary["correct_final"] == sum(line["final_correct"] for line in lines)
    assert summary["mean_length"] == pytest.approx(sum(line["length"] for line in lines) / 5)
    report = json.loads((out / "report.json").read_text())
    assert report["mathvista"]["n"] == 5
    md = (out / "report.md").read_text()
    assert "| mathvista | 5 |" in md and "Skipped (not scored): mathvista 3 (missing field 'answer': 1, " in md

    before = results.read_bytes()
    assert cli(tiny_kit, data_dir, out, *engine_args) == 0  # resume: nothing left to generate
    assert results.read_bytes() == before
    summary = json.loads((out / "mathvista.summary.json").read_text())
    assert (summary["generated"], summary["resumed"], summary["n"], summary["skipped"]) == (0, 5, 5, 3)
    return data_dir, out, lines


def test_cli_hf_engine_end_to_end_and_resume(tiny_kit, tmp_path):
    data_dir, out, lines = check_run(tiny_kit, tmp_path, ["--engine", "hf"])
    # a crash while writing: the last line cut short → that item is generated again, the bad line counted
    results = out / "mathvista.results.jsonl"
    text = results.read_text().splitlines(keepends=True)
    results.write_text("".join(text[:-1]) + text[-1][:25])
    assert cli(tiny_kit, data_dir, out, "--engine", "hf") == 0
    summary = json.loads((out / "mathvista.summary.json").read_text())
    assert (summary["generated"], summary["resumed"], summary["n"]) == (1, 4, 5)
    assert summary["skip_reasons"]["unreadable line in the results file"] == 1
    redone = read_lines_lenient(results)
    assert redone[-1]["id"] == lines[-1]["id"] and redone[-1]["response"] == lines[-1]["response"]  # greedy
    # --limit picks the first valid items only
    assert cli(tiny_kit, data_dir, tmp_path / "out2", "--engine", "hf", "--limit", "2") == 0
    assert [line["id"] for line in read_lines(tmp_path / "out2" / "mathvista.results.jsonl")] == ["1", "2"]


def read_lines_lenient(path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


@pytest.mark.vllm
def test_cli_vllm_engine_end_to_end_and_resume(tiny_kit, tmp_path):
    check_run(tiny_kit, tmp_path, ["--engine", "vllm", "--kv-cache-bytes", str(32 << 20), "--enforce-eager"])


def test_cli_errors(tiny_kit, tmp_path, capsys):
    data = tmp_path / "rows.jsonl"
    data.write_text("{}\n")
    assert main(["--model", str(tiny_kit["vl"]), "--benchmark", "mathvistaa", "--data", str(data),
                 "--out", str(tmp_path / "o")]) == 2
    assert "unknown benchmark 'mathvistaa'" in capsys.readouterr().err
    assert main(["--model", str(tiny_kit["vl"]), "--benchmark", "emma", "--data", str(tmp_path / "none.jsonl"),
                 "--out", str(tmp_path / "o")]) == 2
    assert "data path not found" in capsys.readouterr().err
    # a file of rows none of which fits: every row a counted skip, no engine started, an empty report
    assert main(["--model", str(tiny_kit["vl"]), "--benchmark", "emma", "--data", str(data),
                 "--out", str(tmp_path / "o"), "--no-progress"]) == 0
    summary = json.loads((tmp_path / "o" / "emma.summary.json").read_text())
    assert (summary["n"], summary["skipped"], summary["generated"]) == (0, 1, 0)
    assert summary["skip_reasons"] == {"missing fields ['pid', 'question', 'answer']": 1}


def test_cli_help_runs_without_torch():
    code = ("import sys; from srpo_fast.eval.__main__ import build_parser; build_parser(); "
            "print('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"


def test_load_items_from_a_directory_counts_every_skip(tmp_path):
    from srpo_fast.eval.data import load_items

    good = dict(pid="1", question="q", options=["x", "y"], answer="B", type="Multiple Choice", subject="Math")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "part1.jsonl").write_text(json.dumps(good) + "\n{not json\n\n" + json.dumps(good) + "\n")
    (tmp_path / "a" / "part2.jsonl").write_text(json.dumps(dict(good, pid="2", answer="Q")) + "\n"
                                                + json.dumps(dict(good, pid="3")) + "\n")
    (tmp_path / "a" / "notes.txt").write_text("ignored")
    items, stats = load_items("emma", tmp_path / "a")
    assert [item.id for item in items] == ["1", "3"]
    assert (stats.rows, stats.loaded, stats.skipped) == (5, 2, 3)
    assert stats.reasons == {"invalid JSON: Expecting property name enclosed in double quotes": 1,
                             "duplicate id": 1, "field 'answer' should be an option letter in 'AB', got 'Q'": 1}
    assert [item.id for item in load_items("emma", tmp_path / "a", limit=1)[0]] == ["1"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .jsonl or .parquet files"):
        load_items("emma", tmp_path / "empty")
    with pytest.raises(ValueError, match="unsupported data file"):
        load_items("emma", tmp_path / "a" / "notes.txt")


def test_load_items_from_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    from srpo_fast.eval.data import load_items

    rows = [dict(id=f"test_{i}", image={"bytes": png_bytes((i, 0, 0)), "path": None},
                 options=repr(["a", "b", "c"]), answer="C", subject="Art") for i in range(3)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "vision.parquet")
    items, stats = load_items("mmmu_pro", tmp_path / "vision.parquet")
    assert [item.id for item in items] == ["test_0", "test_1", "test_2"] and stats.skipped == 0
    assert [item.load_images()[0].getpixel((0, 0))[0] for item in items] == [0, 1, 2]
