"""End to end on the tiny VL kit with the synthetic task: a tiny policy trained here to recite set think/answer
responses for the CLI's own records (so a1 is right for some, wrong for others, truncated for one), the HTTP teacher
server from test_distill_http, the CLI in-process. Output rows load back with load_records and every response is a
valid five-block SRPO response whose final answer grades correct; a run stopped mid-way (auth failure) plus a torn
last line resumes without duplicates to the same rows as an uninterrupted run; teacher failures are counted and
retried on the next run; the key never reaches the outputs. The local teacher on HFEngine and, with vLLM, the vLLM
policy."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from test_distill_http import KEY, KEY_ENV, TeacherServer, user_text

from srpo_fast.data.prompts import build_messages
from srpo_fast.data.records import load_records
from srpo_fast.data.synthetic import make_dataset
from srpo_fast.distill import LocalTeacher, ReflectionRequest, TeacherFailure
from srpo_fast.distill.__main__ import main
from srpo_fast.reward.grade import grade_batch
from srpo_fast.reward.parse import parse_response
from srpo_fast.rollout import HFEngine, RolloutEngineConfig, RolloutRequest, SamplingConfig

N = 8
# per task: (think, answer) the tiny policy is trained to give, whatever the image shows
TRAINED = {"count": ("I count the shapes of that color.", "\\boxed{2}"),
           "add": ("I add the two numbers.", "\\boxed{7}"), "compare": ("I compare the two sizes.", "A"),
           "color": ("I look at the shape's color.", "B")}
RAMBLES = 5  # this record's a1 is trained to ramble past policy.max_tokens: a counted a1_truncated skip
RAMBLE = "<think>" + "I add the two numbers, then I add them again. " * 5


@pytest.fixture(scope="module")
def policy_dir(tiny_kit, tmp_path_factory):
    """The tiny VL model fine-tuned (15 Adam steps, ~5 s) to answer the r1 prompt in the think/answer format.

    It is trained on the very records the CLI runs (`--synthetic N`: seed 0), so it recites TRAINED for each of
    them. Trained on other images it would have to generalise, and what a 15-step model says about images it never
    saw turns with float rounding (thread count, CPU): the a1 right/wrong split would be luck, not a fixture."""
    from transformers import AutoModelForImageTextToText

    from srpo_fast.models.processor import load_processor
    from srpo_fast.rollout.encoding import PromptBuilder

    out = tmp_path_factory.mktemp("distill") / "policy"
    shutil.copytree(tiny_kit["vl"], out)
    builder = PromptBuilder(load_processor(out), max_images=1)
    rows = []
    records = make_dataset(N, seed=0)
    for i, r in enumerate(records):
        prompt = builder.prepare(i, RolloutRequest(messages=build_messages(r, "r1"), images=r["images"]))
        target = builder.tokenizer(trained_response(r) + "<|im_end|>",
                                   add_special_tokens=False)["input_ids"]
        rows.append((prompt, target))
    width = max(len(p.prompt_ids) + len(t) for p, t in rows)
    ids = torch.full((len(rows), width), builder.tokenizer.pad_token_id)
    mask, labels, mm = torch.zeros_like(ids), torch.full_like(ids, -100), torch.zeros_like(ids)
    for i, (p, t) in enumerate(rows):
        n = len(p.prompt_ids)
        ids[i, :n + len(t)] = torch.tensor(p.prompt_ids + t)
        mask[i, :n + len(t)] = 1
        labels[i, n:n + len(t)] = torch.tensor(t)
        mm[i, :n] = p.image_inputs.mm_token_type_ids
    pixels = torch.cat([p.image_inputs.pixel_values for p, _ in rows])
    grid = torch.cat([p.image_inputs.image_grid_thw for p, _ in rows])
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32, local_files_only=True).train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(15):
        loss = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grid,
                     mm_token_type_ids=mm, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
    model.save_pretrained(out)
    # the premise of every test below: greedy decoding through our engine gives back what was trained
    engine = HFEngine(RolloutEngineConfig(model=out, dtype="float32", max_model_len=512))
    said = engine.generate([RolloutRequest(messages=build_messages(r, "r1"), images=r["images"]) for r in records],
                           SamplingConfig(temperature=0.0, max_tokens=32))
    assert said.samples[RAMBLES].finish_reason == "length" and "</think>" not in said.samples[RAMBLES].response_text
    assert [s.response_text for i, s in enumerate(said) if i != RAMBLES] == [
        trained_response(r) for i, r in enumerate(records) if i != RAMBLES]
    return out


def trained_response(record):
    if record["id"].endswith(f"-{RAMBLES}"):
        return RAMBLE
    think, answer = TRAINED[record["task"]]
    return f"<think>{think}</think><answer>{answer}</answer>"


def expected_a1_right():
    """How many of the CLI's records the trained answers get right (graded as the pipeline grades them)."""
    records = make_dataset(N, seed=0)
    del records[RAMBLES]
    answers = [parse_response(trained_response(r)).first_answer for r in records]
    return sum(grade_batch(answers, [r["answer"] for r in records], [r.get("options") for r in records]).correct)


def cli(policy_dir, server, out, *extra, engine="hf"):
    return main(["--policy", str(policy_dir), "--teacher-url", server.url, "--teacher-model", "teacher-x",
                 "--teacher-api-key-env", KEY_ENV, "--synthetic", str(N), "--out", str(out), "--engine", engine,
                 "--no-progress", "batch_size=4", "policy.dtype=float32", "policy.max_model_len=512",
                 "policy.temperature=0", "policy.max_tokens=32", "teacher.backoff_s=0.01", "teacher.max_retries=2",
                 "reward.num_workers=1", *extra])


def rows_of(out):
    return [json.loads(line) for line in (out / "data.jsonl").read_text().splitlines()]


def check_rows(out, summary):
    """Every row loads back, parses as five blocks, its final answer grades correct, its a1 verdict is right."""
    records, report = load_records([out / "data.jsonl"], on_bad="error")
    assert report.loaded == summary["done"] == len(records) > 0
    parsed = [parse_response(r["response"]) for r in records]
    assert all(p.structure == "full" and p.well_formed and p.strict and p.reflection_nonempty for p in parsed)
    golds, options = [r["answer"] for r in records], [r.get("options") for r in records]
    assert all(grade_batch([p.last_answer for p in parsed], golds, options).correct)
    firsts = grade_batch([p.first_answer for p in parsed], golds, options).correct
    assert firsts == [r["a1_correct"] for r in records]
    assert [p.first_answer for p in parsed] == [r["a1_answer"] for r in records]
    for r in records:
        assert r["teacher_model"] == "teacher-x" and r["policy_model"].endswith("policy")
        assert r["reflection_kind"] == ("simplify" if r["a1_correct"] else "correct")
        assert ("holds" in r["response"]) == r["a1_correct"]  # the teacher got the right template
        assert r["images"][0].size == (112, 112)
    keys = [r["key"] for r in records]
    assert len(keys) == len(set(keys))
    return records


@pytest.fixture(scope="module")
def clean_run(policy_dir, tmp_path_factory):
    server = TeacherServer()
    server.plan = [429, 500]
    mp = pytest.MonkeyPatch()
    mp.setenv(KEY_ENV, KEY)
    out = tmp_path_factory.mktemp("distill") / "clean"
    try:
        summary = cli(policy_dir, server, out)
    finally:
        mp.undo()
        server.close()
    return out, summary, server


def test_end_to_end_rows_are_valid_srpo_targets(clean_run):
    out, summary, server = clean_run
    records = check_rows(out, summary)
    assert summary["pending"] == 0 and summary["records"] == N
    assert summary["done"] + sum(summary["skipped"].values()) == N
    assert summary["skipped"] == {"a1_truncated": 1}
    assert 0 < summary["a1_right"] == expected_a1_right() < N - 1 == summary["done"]  # both templates exercised
    assert summary["right_fraction"] == round(summary["a1_right"] / summary["done"], 4)
    assert summary["this_run"]["teacher"]["retries"] == 2 and summary["this_run"]["teacher"]["failures"] == {}
    assert summary == json.loads((out / "summary.json").read_text())
    # the record's own fields pass through (the synthetic extras included)
    assert all(r["id"].startswith("synthetic-0-") and r["task"] in TRAINED and "meta" in r for r in records)
    # the key was sent, and never written anywhere
    assert set(server.auth) == {f"Bearer {KEY}"} and len(server.auth) == summary["done"] + 2
    for path in out.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path
    assert f"api_key_env: {KEY_ENV}" in (out / "config.yaml").read_text()


def test_interrupted_run_resumes_without_duplicates(clean_run, policy_dir, tmp_path, monkeypatch):
    ref_out, ref_summary, _ = clean_run
    monkeypatch.setenv(KEY_ENV, KEY)
    out = tmp_path / "resumed"
    server = TeacherServer()
    answered = []

    def flaky(body):
        if "What color" in user_text(body):
            return 500  # this teacher cannot do colour questions: counted failures, retried on the next run
        if len(answered) >= 2:
            return 401  # then the key is revoked: the run stops mid-way
        answered.append(1)
        return None

    server.status_for = flaky
    try:
        with pytest.raises(SystemExit, match="HTTP 401"):
            cli(policy_dir, server, out, "batch_size=2")
        partial = rows_of(out)
        assert 0 < len(partial) < ref_summary["done"]
        with (out / "data.jsonl").open("a") as handle:
            handle.write('{"key": "' + partial[0]["key"][:5])  # and a kill mid-write tears the last line
        server.status_for = lambda body: 500 if "What color" in user_text(body) else None
        second = cli(policy_dir, server, out)
        failed = second["teacher_failures_pending"].get("retries_exhausted", 0)
        assert failed > 0 and second["pending"] == failed
        assert second["this_run"]["teacher_failures"] == {"retries_exhausted": failed}
        assert second["this_run"]["resumed"] == len(partial) + sum(second["skipped"].values()) - sum(
            second["this_run"]["skipped"].values())
        server.status_for = lambda body: None
        third = cli(policy_dir, server, out)
    finally:
        server.close()
    assert third["this_run"]["done"] == failed and third["pending"] == 0
    rows = rows_of(out)
    assert len(rows) == len({r["key"] for r in rows}) == ref_summary["done"]
    ref = {r["key"]: r["response"] for r in rows_of(ref_out)}
    assert {r["key"]: r["response"] for r in rows} == ref
    assert third["skipped"] == ref_summary["skipped"]
    check_rows(out, third)


def test_local_teacher_on_hf_engine(policy_dir):
    engine = HFEngine(RolloutEngineConfig(model=policy_dir, dtype="float32", max_model_len=1024))
    records = make_dataset(2, seed=2)
    reqs = [ReflectionRequest(question=r["problem"], first_response="<think>x</think><answer>1</answer>",
                              a1_correct=bool(i % 2), gold=r["answer"], images=tuple(r["images"]))
            for i, r in enumerate(records)]
    teacher = LocalTeacher(engine, "tiny-teacher", SamplingConfig(temperature=0.0, max_tokens=12))
    out = teacher.reflect(reqs)
    assert len(out) == 2 and all(isinstance(o, str) or o.kind == "truncated" for o in out)
    assert teacher.stats.requests == 2
    short = HFEngine(RolloutEngineConfig(model=policy_dir, dtype="float32", max_model_len=64))
    out = LocalTeacher(short, "tiny-teacher", SamplingConfig(temperature=0.0, max_tokens=8)).reflect(reqs)
    assert [o.kind for o in out] == ["prompt_too_long"] * 2 and all(isinstance(o, TeacherFailure) for o in out)


@pytest.mark.vllm
def test_vllm_policy_end_to_end(policy_dir, tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    server = TeacherServer()
    try:
        summary = cli(policy_dir, server, tmp_path / "vllm", "policy.kv_cache_gb=0.03125",
                      "policy.enforce_eager=true", "policy.max_num_seqs=8", engine="vllm")
    finally:
        server.close()
    check_rows(tmp_path / "vllm", summary)
    assert summary["pending"] == 0 and summary["done"] + sum(summary["skipped"].values()) == N
    # the same vLLM engine as the local teacher (--teacher-local = the policy dir: one engine serves both); the tiny
    # policy answers the teacher prompt in its own tagged format, so those reflections are counted rejections
    local = main(["--policy", str(policy_dir), "--teacher-local", str(policy_dir), "--synthetic", "4",
                  "--out", str(tmp_path / "vllm_local"), "--engine", "vllm", "--no-progress", "policy.dtype=float32",
                  "policy.max_model_len=1024", "policy.temperature=0", "policy.max_tokens=40",
                  "policy.kv_cache_gb=0.03125", "policy.enforce_eager=true", "policy.max_num_seqs=8",
                  "teacher.local.dtype=float32", "teacher.local.temperature=0", "teacher.local.max_tokens=40",
                  "reward.num_workers=1"])
    asked = local["this_run"]["teacher"]["requests"]
    assert asked > 0 and local["this_run"]["teacher"]["succeeded"] + sum(
        local["this_run"]["teacher"]["failures"].values()) == asked
    assert local["done"] + sum(local["skipped"].values()) + local["pending"] == 4
    assert local["teacher_model"] == str(policy_dir)
