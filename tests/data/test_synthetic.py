"""The synthetic visual task: answers verified by recomputation from the scene and from the pixels."""
import random
from collections import deque

import numpy as np
import pytest

from srpo_fast.data.records import IMAGE_PLACEHOLDER, load_records
from srpo_fast.data.synthetic import COLORS, LETTERS, TASKS, make_dataset, make_record, recompute_answer, write_dataset


def _components_of_color(image, rgb):
    """Connected regions of exactly this colour (4-neighbour flood fill), counted from the pixels alone."""
    mask = np.all(np.asarray(image) == np.array(rgb, dtype=np.uint8), axis=-1)
    seen = np.zeros_like(mask)
    count = 0
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        count += 1
        queue = deque([(y, x)])
        seen[y, x] = True
        while queue:
            cy, cx = queue.popleft()
            for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
    return count


@pytest.mark.parametrize("difficulty", [1, 3, 5])
def test_every_answer_recomputes_from_the_scene(difficulty):
    records = make_dataset(60, seed=difficulty, difficulty=difficulty, tasks=TASKS)
    assert {r["task"] for r in records} == set(TASKS)
    for record in records:
        assert recompute_answer(record) == record["answer"]
        assert record["problem"].count(IMAGE_PLACEHOLDER) == len(record["images"]) == 1
        if "options" in record:
            assert record["answer"] in LETTERS[:len(record["options"])]
        elif record["task"] == "name":
            assert record["answer"] in record["meta"]["palette"]
        else:
            assert record["answer"].isdigit()


def test_count_answers_match_the_pixels():
    records = make_dataset(40, seed=3, difficulty=4, tasks=("count",))
    for record in records:
        rgb = COLORS[record["meta"]["target_color"]]
        assert _components_of_color(record["images"][0], rgb) == int(record["answer"])


def test_compare_and_color_answers_match_the_pixels():
    for record in make_dataset(20, seed=5, difficulty=2, tasks=("compare", "color")):
        pixels = np.asarray(record["images"][0])
        if record["task"] == "color":
            x0, y0, x1, y1 = record["meta"]["objects"][0]["box"]
            centre = tuple(pixels[(y0 + y1) // 2 + 2, (x0 + x1) // 2])
            colour_name = next(name for name, rgb in COLORS.items() if tuple(rgb) == centre)
            assert record["answer"] == LETTERS[record["options"].index(colour_name)]
        else:
            areas = [np.all(pixels == np.array(COLORS[o["color"]], dtype=np.uint8), axis=-1).sum()
                     for o in record["meta"]["objects"]]
            assert record["answer"] == (LETTERS[0] if areas[0] > areas[1] else LETTERS[1])


def test_name_answers_match_the_pixels_and_harder_means_more_colors():
    for difficulty in (1, 3, 4):
        records = make_dataset(30, seed=difficulty, difficulty=difficulty, tasks=("name",))
        palette = list(COLORS)[:2 + difficulty]
        assert {r["answer"] for r in records} <= set(palette) and len({r["answer"] for r in records}) >= 3
        for record in records:
            pixels = np.asarray(record["images"][0]).reshape(-1, 3)
            shown = {name for name, rgb in COLORS.items()
                     if np.all(pixels == np.array(rgb, dtype=np.uint8), axis=-1).any()}
            assert shown == {record["answer"]} and record["meta"]["palette"] == palette


def test_deterministic_and_difficulty_matters():
    a, b = make_dataset(8, seed=7), make_dataset(8, seed=7)
    assert [r["answer"] for r in a] == [r["answer"] for r in b]
    assert all(np.array_equal(np.asarray(x["images"][0]), np.asarray(y["images"][0])) for x, y in zip(a, b))
    easy = make_dataset(60, seed=1, difficulty=1, tasks=("count",))
    hard = make_dataset(60, seed=1, difficulty=5, tasks=("count",))
    assert np.mean([int(r["answer"]) for r in hard]) > np.mean([int(r["answer"]) for r in easy])


def test_bad_arguments():
    with pytest.raises(ValueError, match="task"):
        make_record(random.Random(0), "sudoku")
    with pytest.raises(ValueError, match="difficulty"):
        make_record(random.Random(0), "count", difficulty=9)
    with pytest.raises(ValueError, match="image_size"):
        make_record(random.Random(0), "count", image_size=20)


def test_written_dataset_loads_back_in_the_real_schema(tmp_path):
    records = make_dataset(6, seed=2)
    path = write_dataset(records, tmp_path / "ds")
    with path.open("a") as handle:  # bad rows are counted, not silently dropped
        handle.write('{"problem": "<image>no image given", "answer": "1", "images": []}\n')
        handle.write('{"problem": "x", "answer": ""}\nnot json\n')
    loaded, report = load_records([tmp_path / "ds"])
    assert report.loaded == 6 and report.skipped == 3 and len(loaded) == 6
    assert [r["answer"] for r in loaded] == [r["answer"] for r in records]
    assert all(np.array_equal(np.asarray(x["images"][0]), np.asarray(y["images"][0]))
               for x, y in zip(loaded, records))
    with pytest.raises(ValueError, match=r"data\.jsonl:7: 'problem' has 1 <image> placeholders but 0 images"):
        load_records([path], on_bad="error")


def test_lazy_images_are_checked_at_load_and_decoded_on_demand(tmp_path):
    """The trainer loads references (decoded RGB for a real data set would not fit in memory) and decodes a step's
    images only: the same pixels as an eager load; missing or non-image files are counted skips at load time; a
    file broken after loading is a clear RecordError when decoded."""
    import io
    import json

    from srpo_fast.data.records import ImageRef, RecordError, open_images

    records = make_dataset(3, seed=4)
    path = write_dataset(records, tmp_path / "ds")
    png = io.BytesIO()
    records[0]["images"][0].save(png, format="PNG")
    (tmp_path / "ds" / "images" / "junk.png").write_text("not an image")
    with path.open("a") as handle:
        handle.write(json.dumps({"problem": "<image>junk", "answer": "1", "images": ["images/junk.png"]}) + "\n")
        handle.write(json.dumps({"problem": "<image>gone", "answer": "1", "images": ["images/missing.png"]}) + "\n")
    lazy, report = load_records([path], lazy_images=True)
    eager, _ = load_records([path])
    assert len(lazy) == len(eager) == 3 and report.skipped == 2
    assert all(isinstance(r["images"][0], ImageRef) for r in lazy)
    assert all(np.array_equal(np.asarray(open_images(a)["images"][0]), np.asarray(b["images"][0]))
               for a, b in zip(lazy, eager))
    from_bytes = ImageRef(data=png.getvalue()).open()
    assert np.array_equal(np.asarray(from_bytes), np.asarray(records[0]["images"][0]))
    lazy[1]["images"][0].path.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(RecordError, match="cannot be decoded"):
        open_images(lazy[1])
