"""The shipped recipe (configs/*_7b.yaml) against the paper and the released code, the run plan said at start-up,
acc/final against evaluation's scorer, and dynamic sampling (fill, bound, surplus, determinism)."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from torch import nn

from srpo_fast.config import ConfigError, load_config
from srpo_fast.train.batches import split_mini_batches

ROOT = Path(__file__).resolve().parent.parent.parent
SRPO_7B = ROOT / "configs" / "srpo_qwen2_5_vl_7b.yaml"
SFT_7B = ROOT / "configs" / "sft_qwen2_5_vl_7b.yaml"
DISTILL_7B = ROOT / "configs" / "distill_qwen2_5_vl_7b.yaml"
LABELS = ("paper", "released code", "our choice")


@dataclass(frozen=True)
class Fact:
    group: int


# ------------------------------------------------------------------------------------------- the shipped recipe

def test_7b_config_gives_8_optimizer_steps_of_128_samples_per_1024_samples():
    from srpo_fast.train.run import DataOrder, plan_run

    cfg = load_config(SRPO_7B)
    samples = cfg.train.prompts_per_step * cfg.rollout.n
    assert samples == 1024
    plan = plan_run(cfg, DataOrder(30_000, cfg.train.prompts_per_step, 0), samples_per_step=samples,
                    optimizer_steps_per_step=cfg.algo.ppo_epochs * cfg.algo.mini_batches)
    assert plan.optimizer_steps_per_step == 8 and plan.samples_per_step == 1024
    assert plan.epochs == 3 and plan.steps == 3 * (30_000 // 128) and plan.optimizer_steps == 8 * plan.steps
    # the trainer's own split of a full step (128 groups of 8) gives 8 optimizer steps of 128 samples each
    facts = [Fact(group=g) for g in range(cfg.train.prompts_per_step) for _ in range(cfg.rollout.n)]
    minis = split_mini_batches(facts, cfg.algo.mini_batches)
    assert [len(m) for m in minis] == [128] * 8
    assert sorted(i for m in minis for i in m) == list(range(1024))
    assert "8 optimizer steps per step of 128 samples each" in plan.describe()
    with pytest.raises(ConfigError, match="algo.mini_batches"):
        load_config(SRPO_7B, ["train.prompts_per_step=4"])


def test_a_step_with_fewer_kept_groups_than_mini_batches_takes_fewer_whole_group_steps():
    """The filter may keep fewer groups than algo.mini_batches (8 in the 7B recipe): the step then makes one
    optimizer step per kept group instead of failing mid-run; a full step keeps all 8."""
    from srpo_fast.train.batches import StepItems
    from srpo_fast.train.grpo import mini_batch_count

    def step(groups: int) -> StepItems:
        return StepItems(facts=[Fact(group=g) for g in range(groups) for _ in range(8)], local={})

    assert [mini_batch_count(step(g), 8) for g in (1, 3, 7, 8, 128)] == [1, 3, 7, 8, 8]
    assert mini_batch_count(step(0), 8) == 1
    assert [len(m) for m in split_mini_batches(step(3).facts, mini_batch_count(step(3), 8))] == [8, 8, 8]
    with pytest.raises(ValueError, match="cannot fill"):  # what the step did before: die after its rollout
        split_mini_batches(step(3).facts, 8)


def test_7b_optimizer_and_schedule_are_the_released_ones():
    """betas (0.9, 0.95), no weight decay, 3% linear warm-up, cosine to 0.1 x lr, as built by the trainer."""
    from srpo_fast.models import build_lr_scheduler, build_optimizer

    cfg = load_config(SRPO_7B)
    t = cfg.train
    assert (t.adam_betas, t.weight_decay, t.warmup_ratio, t.lr_schedule, t.min_lr_ratio) == (
        [0.9, 0.95], 0.0, 0.03, "cosine", 0.1)
    model = nn.Linear(4, 4)
    optimizer = build_optimizer(model, t.lr, betas=tuple(t.adam_betas), eps=t.adam_eps, weight_decay=t.weight_decay)
    assert all(g["betas"] == (0.9, 0.95) for g in optimizer.param_groups)
    total = 1000
    scheduler = build_lr_scheduler(optimizer, total_steps=total, warmup_ratio=t.warmup_ratio,
                                   schedule=t.lr_schedule, min_lr_ratio=t.min_lr_ratio)
    lrs = []
    for _ in range(total):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    warmup = math.ceil(0.03 * total)
    assert lrs[0] == pytest.approx(t.lr / warmup) and lrs[warmup - 1] == pytest.approx(t.lr)
    assert all(a <= b for a, b in zip(lrs[:warmup], lrs[1:warmup]))  # rising during the warm-up
    assert all(a >= b for a, b in zip(lrs[warmup:], lrs[warmup + 1:]))  # then only falling
    assert scheduler.get_last_lr()[0] == pytest.approx(0.1 * t.lr)
    with pytest.raises(ConfigError, match="train.adam_betas"):
        load_config(SRPO_7B, ["train.adam_betas=[0.9]"])
    with pytest.raises(ConfigError, match="train.adam_betas"):
        load_config(SRPO_7B, ["train.adam_betas=[0.9, 1.0]"])
    with pytest.raises(ConfigError, match="train.warmup_ratio"):
        load_config(SRPO_7B, ["train.warmup_ratio=1.0"])


def test_7b_configs_freeze_the_whole_vision_tower_merger_included(tiny_kit):
    from srpo_fast.models.loading import load_policy

    for path in (SRPO_7B, SFT_7B):
        m = load_config(path).model
        model = load_policy(tiny_kit["vl"], freeze_vision=m.freeze_vision, freeze_projector=m.freeze_projector)
        visual = {n: p.requires_grad for n, p in model.named_parameters() if "visual" in n}
        assert any("merger" in n for n in visual) and not any(visual.values()), path.name
        assert any(p.requires_grad for n, p in model.named_parameters() if "visual" not in n)


def test_sft_config_is_one_epoch_at_the_released_batch_with_the_released_cutoff():
    cfg = load_config(SFT_7B)
    assert cfg.train.epochs == 1 and cfg.train.prompts_per_step == 1 * 2 * 8
    assert cfg.data.max_prompt_tokens + cfg.data.max_response_tokens == 4096  # the released cutoff_len
    with pytest.raises(ConfigError, match="data.max_response_tokens"):
        load_config(SRPO_7B, ["data.max_response_tokens=100"])  # GRPO's cut-off is rollout.max_tokens
    with pytest.raises(ConfigError, match="data.max_response_tokens"):
        load_config(SFT_7B, ["data.max_response_tokens=0"])


@pytest.mark.parametrize("path", [SRPO_7B, SFT_7B, DISTILL_7B], ids=lambda p: p.name)
def test_every_7b_setting_says_where_it_comes_from(path):
    """Each key with a value carries "paper", "released code" or "our choice" in its comment (or the comment
    continues on the next line)."""
    lines = path.read_text().splitlines()
    unlabelled = []
    for i, line in enumerate(lines):
        m = re.match(r"^\s*[\w.]+:\s*(\S[^#]*?)?\s*(#.*)?$", line)
        if not m or line.lstrip().startswith("#") or not m.group(1):
            continue  # a comment or a section header
        comment = (m.group(2) or "") + " " + (lines[i + 1] if i + 1 < len(lines) else "")
        if not any(label in comment for label in LABELS):
            unlabelled.append(line)
    assert not unlabelled, unlabelled


def test_max_steps_beyond_the_epochs_adds_epochs_and_says_so():
    from srpo_fast.train.run import DataOrder, plan_run

    order = DataOrder(8, 4, seed=0)  # 2 steps per epoch
    cfg = load_config(None, ["train.epochs=1", "train.max_steps=5"])
    plan = plan_run(cfg, order, samples_per_step=16, optimizer_steps_per_step=2)
    assert plan.steps == 5 and plan.epochs == 2.5 and plan.optimizer_steps == 10
    assert "train.max_steps=5 adds epochs" in plan.describe()
    assert [order.epoch_of(s) for s in range(1, 6)] == [0, 0, 1, 1, 2]  # the data order runs on into them
    assert sorted(order.indices(3) + order.indices(4)) == list(range(8))  # epoch 2 visits every record once
    short = plan_run(load_config(None, ["train.epochs=3", "train.max_steps=1"]), order, samples_per_step=16,
                     optimizer_steps_per_step=1)
    assert short.steps == 1 and "stops early" in short.describe()
    assert "train.max_steps" not in plan_run(load_config(None, ["train.epochs=2"]), order, samples_per_step=16,
                                              optimizer_steps_per_step=1).describe()


# ------------------------------------------------------------------------------------------------ acc/final

RESPONSES = [
    "<think>2+2</think><answer>4</answer>",  # right, no reflection: final = first = right
    "<think>2+2</think><answer>\\boxed{4}</answer>",
    "<think>x</think><answer>3</answer>",  # wrong, no reflection
    "<think>a</think><answer>3</answer><reflection>off by one</reflection><think>b</think><answer>4</answer>",  # fix
    "<think>a</think><answer>4</answer><reflection>hmm</reflection><think>b</think><answer>5</answer>",  # break
    "<think>a</think><answer>3</answer> stray <answer>4</answer>",  # malformed, two answers: the last counts
    "<think>a</think><answer>4</answer><answer>4</answer>",
    "no tags at all, but \\boxed{4}",  # boxed fallback
    "no tags, the last line holds it\n4",  # last-line fallback
    "",
    "<think>unfinished reasoning",
]


@pytest.mark.parametrize("preset", ["paper", "official", "r1"])
def test_acc_final_is_the_last_answer_and_agrees_with_eval_score_item(preset):
    from srpo_fast.eval import score_item
    from srpo_fast.reward import RewardConfig, score_batch
    from srpo_fast.train.experience import final_answer_correct

    cfg = load_config(None, [f"reward.preset={preset}", "reward.num_workers=1"])
    answers = ["4"] * len(RESPONSES)
    reward = score_batch(RESPONSES, answers, config=cfg.reward)
    final = final_answer_correct(cfg, RESPONSES, answers, [None] * len(RESPONSES), reward).tolist()
    row = {"id": "q", "question": "What is 2+2?", "answer": "4", "options": []}
    expected = [score_item("mathvision", row, r, config=RewardConfig(num_workers=1)).final_correct
                for r in RESPONSES]
    assert final == expected
    assert final[:3] == [True, True, False] and final[3:5] == [True, False]


def test_two_right_answers_without_reflection_give_acc_final_one():
    """The audit's case: acc/first 1.0 and acc/final 1.0 (it was 0.0) for right answers that do not reflect."""
    from srpo_fast.rollout import Rollouts, RolloutSample
    from srpo_fast.train.experience import score_rollouts, step_metrics

    cfg = load_config(None, ["reward.num_workers=1", "algo.filter_groups=false"])
    texts = ["<think>2+2</think><answer>4</answer>", "<think>two twos</think><answer>\\boxed{4}</answer>"]
    samples = [RolloutSample(group=0, index_in_group=k, prompt_ids=[1, 2], response_ids=[3, 4, 5],
                             response_text=t, logprobs=None, finish_reason="stop", image_inputs=None)
               for k, t in enumerate(texts)]
    experience = score_rollouts(cfg, Rollouts(samples, 1, 2, "processed", 1.0), [{"answer": "4"}], None)
    metrics = step_metrics({**experience.sums, "bad_records": 0.0})
    assert metrics["acc/first"] == 1.0 and metrics["acc/final"] == 1.0
    assert metrics["reflect/rate"] == 0.0


# ------------------------------------------------------------------------------------------- dynamic sampling

def test_extra_prompts_are_keyed_on_the_step_alone():
    from srpo_fast.train.run import DataOrder

    order = DataOrder(20, 4, seed=3)
    own = set(order.indices(7))
    first, second = order.extra_indices(7, 1), order.extra_indices(7, 2)
    assert len(first) == len(second) == 4 and not (set(first) | set(second)) & own
    assert not set(first) & set(second)  # rounds draw distinct records while there are any
    assert DataOrder(20, 4, seed=3).extra_indices(7, 2) == second  # a fresh order (a resumed run) draws the same
    assert order.extra_indices(8, 1) != first
    assert len(set(sum((order.extra_indices(7, r) for r in range(1, 9)), []))) == 16  # then wraps around
    small = DataOrder(4, 4, seed=0)  # every record is in the step's slice
    assert sorted(small.extra_indices(1, 1)) == [0, 1, 2, 3]


def digit_records(answers):
    return [{"problem": f"Write the number {a}.", "answer": str(a), "images": []} for a in answers]


@pytest.fixture(scope="module")
def text_engine(tiny_kit):
    from srpo_fast.rollout import HFEngine, RolloutEngineConfig

    return HFEngine(RolloutEngineConfig(model=tiny_kit["text"], dtype="float32", max_model_len=512,
                                        on_overlong_prompt="skip", hf_batch_size=16))


def collect(engine, answers, *overrides, step=1):
    from srpo_fast.train.experience import collect_experience
    from srpo_fast.train.run import DataOrder

    cfg = load_config(None, ["reward.preset=trainer_rewards:odd_answers_mixed", "reward.num_workers=1",
                             "rollout.n=2", "rollout.max_tokens=4", "train.prompts_per_step=4",
                             "data.shuffle=false", "algo.dynamic_sampling=true", *overrides])
    records = digit_records(answers)
    order = DataOrder(len(records), cfg.train.prompts_per_step, cfg.train.seed, cfg.data.shuffle)
    phases = []

    def timer(name):
        phases.append(name)
        from contextlib import nullcontext
        return nullcontext()

    experience = collect_experience(cfg, engine, records, order, step, lambda texts: [len(t) for t in texts],
                                    timer)
    return experience, order, phases


def groups_of(items):
    out = {}
    for item in items:
        out.setdefault(item.group, []).append(item)
    return out


def test_dynamic_sampling_fills_the_step_when_half_the_groups_are_filtered(text_engine):
    """Odd answers keep their group, even ones are filtered: the step's own 4 prompts keep 2 groups, the second
    round (4 other records, again half odd) brings the kept groups to 4 = train.prompts_per_step."""
    experience, _, phases = collect(text_engine, [1, 2, 3, 4, 5, 6, 7, 8])
    assert experience.totals["dynamic/gen_rounds"] == 2 and experience.totals["dynamic/filled"] == 1.0
    assert experience.totals["dynamic/trained_groups"] == 4 and experience.totals["dynamic/hit_round_limit"] == 0
    groups = groups_of(experience.items)
    assert len(groups) == 4 and all(len(g) == 2 for g in groups.values())
    assert experience.sums["samples"] == 16 and experience.sums["groups/kept"] == 4  # both rounds counted
    assert phases == ["rollout", "reward"] * 2
    off, _, _ = collect(text_engine, [1, 2, 3, 4, 5, 6, 7, 8], "algo.dynamic_sampling=false")
    assert len(groups_of(off.items)) == 2 and off.sums["samples"] == 8 and off.totals == {}


def test_dynamic_sampling_stops_at_its_bound_when_every_group_is_filtered(text_engine):
    experience, _, phases = collect(text_engine, [2, 4, 6, 8, 10, 12, 14, 16], "algo.max_gen_rounds=3")
    assert experience.items == []
    assert experience.totals["dynamic/gen_rounds"] == 3 and experience.totals["dynamic/hit_round_limit"] == 1
    assert experience.totals["dynamic/filled"] == 0 and experience.sums["samples"] == 3 * 4 * 2
    assert len(phases) == 6


def test_dynamic_sampling_trains_exactly_the_step_size_and_drops_the_surplus(text_engine):
    """First round: 1 odd of 4; the extra round's 4 records are all odd: 5 kept, 4 trained, 1 dropped — the last
    round's last group, in the fixed order."""
    answers = [1, 2, 4, 6, 3, 5, 7, 9]
    experience, order, _ = collect(text_engine, answers)
    totals = experience.totals
    assert (totals["dynamic/kept_groups"], totals["dynamic/trained_groups"], totals["dynamic/dropped_groups"]) == (
        5, 4, 1)
    groups = groups_of(experience.items)
    assert sorted(groups) == [0, 4, 5, 6]  # round 0: group 0 (answer 1); round 1 (offset 4): its first three
    again, _, _ = collect(text_engine, answers)  # same step, same draws, same samples
    assert [i.sample.response_ids.tolist() for i in again.items] == [
        i.sample.response_ids.tolist() for i in experience.items]


def test_round_quotas_fill_in_round_then_rank_order():
    """Which kept groups train when the rounds overshoot: (round, rank) order, whatever the world size."""
    from srpo_fast.train.experience import _round_quotas

    assert _round_quotas([[1, 2]], 4) == [[1, 2]]  # under the target: everything
    assert _round_quotas([[1, 2], [3, 1]], 4) == [[1, 2], [1, 0]]  # round 1: rank 0 takes the last slot
    assert _round_quotas([[0, 0], [2, 5]], 4) == [[0, 0], [2, 2]]
    assert _round_quotas([[5, 5]], 4) == [[4, 0]]
    assert sum(map(sum, _round_quotas([[3, 0, 2, 4], [1, 1, 1, 1]], 8))) == 8
