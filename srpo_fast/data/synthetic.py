"""A generated visual-math task with verifiable answers: the demo's data and the tests' data.

No data set can be downloaded here, so this stands in for MathV360K/Geometry3K-style records. Each record uses the
schema real data uses (EasyR1/verl: `problem` with an `<image>` placeholder, `answer`, `images`), plus `options` for
multiple-choice items and `meta`, the scene description the answer is computed from, so tests can check every
answer by recomputing it from the meta and from the pixels.

Tasks (all answers exact):
- count:   "How many red shapes are in the image?"        free-form integer
- add:     "What is the sum of the two numbers shown?"     free-form integer (digits drawn in the image)
- compare: "Which shape is larger? A. the red one ..."     multiple choice, answer a letter
- color:   "What color is the circle? A. red B. ..."       multiple choice, answer a letter
- name:    "What color is the shape?"                      free-form color word; the lowest rung of the task
           ladder (the color of one shape is readable from the mean of the image tokens, so the demo's random-init
           tiny model can learn it on a CPU budget)
`difficulty` 1..5 raises object counts, digit counts, distractors, and shrinks size differences.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

TASKS = ("count", "add", "compare", "color", "name")
DEFAULT_TASKS = ("count", "add", "compare", "color")  # the mixed task; "name" is the demo's rung
COLORS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220), "yellow": (235, 200, 20),
          "purple": (140, 50, 170), "orange": (245, 130, 20)}
SHAPES = ("circle", "square", "triangle")
BACKGROUND = (255, 255, 255)
LETTERS = "ABCDEFGHIJ"


@dataclass(frozen=True)
class Box:
    x0: int
    y0: int
    x1: int
    y1: int

    def overlaps(self, other: Box, gap: int = 3) -> bool:
        return not (self.x1 + gap <= other.x0 or other.x1 + gap <= self.x0 or
                    self.y1 + gap <= other.y0 or other.y1 + gap <= self.y0)


def _place(rng: random.Random, size: int, side: int, taken: list[Box], tries: int = 200) -> Box | None:
    """A free square of the given side, not touching the boxes already taken (rejection sampling)."""
    for _ in range(tries):
        x, y = rng.randint(1, size - side - 1), rng.randint(1, size - side - 1)
        box = Box(x, y, x + side, y + side)
        if not any(box.overlaps(t) for t in taken):
            taken.append(box)
            return box
    return None


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: Box, color: tuple) -> None:
    xy = (box.x0, box.y0, box.x1, box.y1)
    if shape == "circle":
        draw.ellipse(xy, fill=color)
    elif shape == "square":
        draw.rectangle(xy, fill=color)
    else:
        draw.polygon([((box.x0 + box.x1) // 2, box.y0), (box.x0, box.y1), (box.x1, box.y1)], fill=color)


def _options_text(options: list[str]) -> str:
    return "\n".join(f"{LETTERS[i]}. {text}" for i, text in enumerate(options))


def _count(rng: random.Random, difficulty: int, size: int):
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    color, *others = rng.sample(list(COLORS), 1 + min(difficulty, 3))
    target = rng.randint(1, 2 + 2 * difficulty)
    side = max(8, size // (4 + difficulty))
    taken: list[Box] = []
    objects = []
    for i in range(target + rng.randint(0, difficulty)):
        box = _place(rng, size, side, taken)
        if box is None:
            break
        c = color if i < target else rng.choice(others)
        shape = rng.choice(SHAPES)
        _draw_shape(draw, shape, box, COLORS[c])
        objects.append({"shape": shape, "color": c, "box": [box.x0, box.y0, box.x1, box.y1]})
    answer = sum(o["color"] == color for o in objects)
    problem = f"<image>How many {color} shapes are in the image?"
    return image, problem, str(answer), None, {"target_color": color, "objects": objects}


def _add(rng: random.Random, difficulty: int, size: int):
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    digits = min(difficulty, 3)
    a, b = rng.randint(0, 10 ** digits - 1), rng.randint(0, 10 ** digits - 1)
    font = ImageFont.load_default(size=max(12, size // 4))
    draw.text((size // 10, size // 8), str(a), fill=(0, 0, 0), font=font)
    draw.text((size // 10, size // 2), str(b), fill=(0, 0, 0), font=font)
    problem = "<image>What is the sum of the two numbers shown in the image?"
    return image, problem, str(a + b), None, {"numbers": [a, b]}


def _compare(rng: random.Random, difficulty: int, size: int):
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    first, second = rng.sample(list(COLORS), 2)
    big = rng.randint(size // 4, size // 2 - 4)
    small = max(6, int(big * (0.4 + 0.1 * difficulty)))  # harder → closer sizes
    small = min(small, big - 2)
    sides = {first: big, second: small} if rng.random() < 0.5 else {first: small, second: big}
    shape = rng.choice(SHAPES)
    objects = []
    for c, corner in ((first, 2), (second, size - 2 - sides[second])):  # opposite corners never overlap
        box = Box(corner, corner, corner + sides[c], corner + sides[c])
        _draw_shape(draw, shape, box, COLORS[c])
        objects.append({"shape": shape, "color": c, "box": [box.x0, box.y0, box.x1, box.y1]})
    options = [f"the {first} one", f"the {second} one"]
    answer = LETTERS[0] if sides[first] > sides[second] else LETTERS[1]
    problem = f"<image>Which {shape} is larger?\n{_options_text(options)}\nAnswer with the option's letter."
    return image, problem, answer, options, {"objects": objects}


def _color(rng: random.Random, difficulty: int, size: int):
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    shape, *distractor_shapes = rng.sample(SHAPES, 3)
    n_options = min(2 + difficulty, len(COLORS))
    options = rng.sample(list(COLORS), n_options)
    color = rng.choice(options)
    taken: list[Box] = []
    objects = []
    for i in range(1 + min(difficulty - 1, 2)):
        s = shape if i == 0 else distractor_shapes[i - 1]
        c = color if i == 0 else rng.choice([x for x in COLORS if x != color])
        box = _place(rng, size, size // 4, taken)
        if box is None:  # three quarter-size squares always fit; this guards against a future size change
            raise RuntimeError(f"could not place {len(objects) + 1} shapes in a {size}px image")
        _draw_shape(draw, s, box, COLORS[c])
        objects.append({"shape": s, "color": c, "box": [box.x0, box.y0, box.x1, box.y1]})
    answer = LETTERS[options.index(color)]
    problem = f"<image>What color is the {shape}?\n{_options_text(options)}\nAnswer with the option's letter."
    return image, problem, answer, options, {"objects": objects}


def _name(rng: random.Random, difficulty: int, size: int):
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    palette = list(COLORS)[:min(2 + difficulty, len(COLORS))]  # harder → more colors to tell apart
    color, shape = rng.choice(palette), rng.choice(SHAPES)
    side = rng.randint(size // 3, size // 2)
    box = _place(rng, size, side, [])
    _draw_shape(draw, shape, box, COLORS[color])
    objects = [{"shape": shape, "color": color, "box": [box.x0, box.y0, box.x1, box.y1]}]
    return image, "<image>What color is the shape in the image?", color, None, {"objects": objects, "palette": palette}


_MAKERS = {"count": _count, "add": _add, "compare": _compare, "color": _color, "name": _name}


def make_record(rng: random.Random, task: str, difficulty: int = 1, image_size: int = 112) -> dict:
    if task not in _MAKERS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if not 1 <= difficulty <= 5:
        raise ValueError(f"difficulty must be in 1..5, got {difficulty}")
    if image_size < 56:
        raise ValueError(f"image_size must be >= 56 (the smallest image Qwen2.5-VL's processor takes), "
                         f"got {image_size}")
    image, problem, answer, options, meta = _MAKERS[task](rng, difficulty, image_size)
    record = {"problem": problem, "answer": answer, "images": [image], "task": task, "difficulty": difficulty,
              "meta": meta}
    if options is not None:
        record["options"] = options
    return record


def make_dataset(n: int, seed: int = 0, difficulty: int = 1, tasks: tuple[str, ...] = DEFAULT_TASKS,
                 image_size: int = 112) -> list[dict]:
    """n records cycling through `tasks`, deterministic given the seed. Images are PIL images in memory."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    for task in tasks:
        if task not in _MAKERS:
            raise ValueError(f"unknown task {task!r}; known: {TASKS}")
    rng = random.Random(seed)
    records = []
    for i in range(n):
        record = make_record(rng, tasks[i % len(tasks)], difficulty, image_size)
        record["id"] = f"synthetic-{seed}-{i}"
        records.append(record)
    return records


def write_dataset(records: list[dict], out_dir: str | Path) -> Path:
    """Save as `data.jsonl` + PNG files, image paths relative to the jsonl, as the loaders read real data sets."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, record in enumerate(records):
        paths = []
        for j, image in enumerate(record["images"]):
            rel = f"images/{record.get('id', i)}-{j}.png"
            image.save(out / rel)
            paths.append(rel)
        lines.append(json.dumps({**record, "images": paths}))
    path = out / "data.jsonl"
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("\n".join(lines) + ("\n" if lines else ""))
    tmp.replace(path)
    return path


def recompute_answer(record: dict) -> str:
    """The answer derived again from the record's scene description (`meta`), independently of the generator."""
    task, meta = record["task"], record["meta"]
    if task == "count":
        return str(sum(o["color"] == meta["target_color"] for o in meta["objects"]))
    if task == "add":
        return str(sum(meta["numbers"]))
    if task == "compare":
        sides = [o["box"][2] - o["box"][0] for o in meta["objects"]]
        return LETTERS[0] if sides[0] > sides[1] else LETTERS[1]
    if task == "color":
        return LETTERS[record["options"].index(meta["objects"][0]["color"])]
    if task == "name":
        return meta["objects"][0]["color"]
    raise ValueError(f"unknown task {task!r}")
