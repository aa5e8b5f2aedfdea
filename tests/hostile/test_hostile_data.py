"""Hostile data files: bytes that are not UTF-8, UTF-16 and Latin-1 files, JSON nested past the parser's
recursion limit, an image "bytes" field holding 2**40, corrupt and empty parquet files, image paths that leave the
data directory. Each is a counted skip naming file and line (training, distill and eval loaders alike); the good
rows around them still load."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from srpo_fast.data.records import load_records

pytestmark = pytest.mark.timeout(60)

DEEP = "[" * 200_000 + "]" * 200_000


def png(path: Path) -> Path:
    Image.new("RGB", (8, 8), (200, 10, 10)).save(path)
    return path


def good_row(i: int, image: str = "img.png") -> dict:
    return {"problem": f"<image>What is {i}+{i}?", "answer": str(2 * i), "images": [image]}


@pytest.fixture
def data_dir(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    png(d / "img.png")
    png(tmp_path / "secret.png")  # outside the data directory
    return d


def write_lines(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


def test_bad_lines_are_counted_skips_naming_file_and_line(data_dir, tmp_path):
    f = write_lines(data_dir / "train.jsonl", [
        json.dumps(good_row(1)).encode(),                                          # 1 ok
        b'{"problem": "caf\xe9 <image>", "answer": "1", "images": ["img.png"]}',  # 2 Latin-1 byte
        DEEP.encode(),                                                            # 3 RecursionError in json
        json.dumps({**good_row(4), "images": [{"bytes": 2 ** 40}]}).encode(),     # 4 would allocate 1 TB
        json.dumps(good_row(5, "../secret.png")).encode(),                        # 5 escapes the data dir
        json.dumps(good_row(6, str(tmp_path / "secret.png"))).encode(),           # 6 absolute, outside
        json.dumps({**good_row(7), "images": [{"path": "a\u0000b"}]}).encode(),   # 7 NUL in a path
        json.dumps(good_row(8)).encode(),                                         # 8 ok
    ])
    records, report = load_records([data_dir], lazy_images=True)
    assert [r["answer"] for r in records] == ["2", "16"]
    assert report.loaded == 2 and report.skipped == 6
    assert report.reasons == {"not UTF-8": 1, "invalid JSON": 1, "image bytes must be bytes, got int": 1,
                              "image path outside the data directory": 2, "image path holds a NUL byte": 1}
    for line in (2, 3, 4, 5, 6, 7):
        assert any(d.startswith(f"{f}:{line}: ") for d in report.details), (line, report.details)
    assert str(f) in report.describe()
    with pytest.raises(ValueError, match=f"{f}:2: not UTF-8"):
        load_records([f], on_bad="error")
    # with the escape hatch the outside images load; the other bad lines stay skipped
    records, report = load_records([data_dir], lazy_images=True, allow_outside_paths=True)
    assert [r["answer"] for r in records] == ["2", "10", "12", "16"]


def test_unreadable_files_do_not_abort_their_directory(data_dir):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([good_row(i) for i in range(1, 4)]), data_dir / "a_good.parquet")
    (data_dir / "b_empty.parquet").write_bytes(b"")
    (data_dir / "c_corrupt.parquet").write_bytes(b"PAR1" + os.urandom(512) + b"PAR1")
    (data_dir / "d_utf16.jsonl").write_bytes(json.dumps(good_row(9)).encode("utf-16"))
    write_lines(data_dir / "e_good.jsonl", [json.dumps(good_row(10)).encode()])
    records, report = load_records([data_dir], lazy_images=True)
    assert sorted(r["answer"] for r in records) == ["2", "20", "4", "6"]
    assert report.skipped == 3 and report.reasons == {"unreadable file": 3}
    for name in ("b_empty.parquet", "c_corrupt.parquet", "d_utf16.jsonl"):
        assert any(d.startswith(str(data_dir / name) + ": unreadable file") for d in report.details), name


def test_distill_loader_skips_outside_images_before_any_teacher_sees_them(data_dir, tmp_path):
    from srpo_fast.distill.build import load_data
    from srpo_fast.distill.config import load_distill_config

    write_lines(data_dir / "d.jsonl", [json.dumps(good_row(1)).encode(),
                                       json.dumps(good_row(2, "../secret.png")).encode()])
    cfg = load_distill_config(None, [f"data.files=[{data_dir / 'd.jsonl'}]"])
    records, info = load_data(cfg)
    assert len(records) == 1 and info["bad_rows"] == 1
    assert info["bad_reasons"] == {"image path outside the data directory": 1}
    assert info["bad_rows_first"][0].startswith(f"{data_dir / 'd.jsonl'}:2: ")
    cfg = load_distill_config(None, [f"data.files=[{data_dir / 'd.jsonl'}]", "data.allow_outside_paths=true"])
    assert len(load_data(cfg)[0]) == 2


def test_eval_loader_nested_choices_empty_answers_and_outside_images(tmp_path):
    from srpo_fast.eval.data import load_items

    d = tmp_path / "bench"
    d.mkdir()
    png(tmp_path / "secret.png")
    base = dict(question="q", options=["x", "y"], answer="B", type="Multiple Choice", subject="Math")
    rows = [dict(base, pid="1"),
            dict(base, pid="2", options=DEEP),                # RecursionError in literal_eval and in json
            dict(base, pid="3", answer="", type="Free Form", options=[]),
            dict(base, pid="4", image_1="../secret.png"),
            dict(base, pid="5")]
    f = d / "emma.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    items, stats = load_items("emma", d)
    assert [i.id for i in items] == ["1", "4", "5"]
    assert stats.skipped == 2
    assert any(k.startswith("field 'options' is not a list") for k in stats.reasons)
    assert "empty 'answer'" in stats.reasons
    assert {x.split(": ")[0] for x in stats.details} == {f"{f}:2", f"{f}:3"}
    outside = items[1]
    from srpo_fast.eval.benchmarks import RowError

    with pytest.raises(RowError, match="outside the data directory"):
        outside.load_images()
    items, _ = load_items("emma", d, allow_outside_paths=True)
    assert items[1].load_images()[0].size == (8, 8)


@pytest.mark.parametrize("flag,value", [("--max-tokens", "0"), ("--temperature", "-1"), ("--temperature", "nan"),
                                        ("--top-p", "0"), ("--limit", "-5"), ("--batch-size", "0"),
                                        ("--gpu-memory-utilization", "inf")])
def test_eval_cli_rejects_bad_numbers_with_a_usage_error(flag, value, capsys):
    from srpo_fast.eval.__main__ import main

    with pytest.raises(SystemExit) as info:
        main(["--model", "m", "--benchmark", "emma", "--data", "d", "--out", "o", flag, value])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and "Traceback" not in err
