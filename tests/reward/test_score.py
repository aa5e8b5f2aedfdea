"""Reward dispatch: the built-in presets by name (with their aliases) and "module:function" rewards, all reached from
RewardConfig through score_batch; unknown or broken names fail clearly."""
import pytest

from srpo_fast.reward import RewardConfig, score_batch
from srpo_fast.reward.score import reward_function

SRPO_FIXED = "<think>a</think><answer>3</answer><reflection>no</reflection><think>b</think><answer>4</answer>"


def test_presets_and_aliases():
    assert RewardConfig(preset="paper").resolved_preset == "srpo_paper"
    assert RewardConfig(preset="srpo_official").resolved_preset == "srpo_official"
    assert RewardConfig(preset="official").resolved_length_shape == "gaussian"
    # an alias and its full name run the same composition; the three presets differ on a fixed reflection
    totals = {name: score_batch([SRPO_FIXED], ["4"], RewardConfig(preset=name, num_workers=1)).total.item()
              for name in ("paper", "srpo_paper", "official", "srpo_official", "r1")}
    assert totals["paper"] == totals["srpo_paper"] and totals["official"] == totals["srpo_official"]
    assert len({totals["paper"], totals["official"], totals["r1"]}) == 3
    assert totals["r1"] == 0.0  # two think/answer pairs are not r1's format, and A1 is wrong


def test_module_path(tmp_path, monkeypatch):
    (tmp_path / "my_user_reward.py").write_text(
        "import torch\n"
        "from srpo_fast.reward.srpo import RewardOutput\n"
        "calls = []\n"
        "def length_only(responses, answers, *, config, options=None, device=None, **kwargs):\n"
        "    calls.append((list(responses), list(answers), options, device))\n"
        "    t = torch.tensor([float(len(r)) for r in responses])\n"
        "    f = torch.zeros(len(responses), dtype=torch.bool)\n"
        "    z = t * 0\n"
        "    return RewardOutput(total=t, format=z, accuracy=z, reflection_format=z, effectiveness=z,\n"
        "                        length=t, first_correct=f, second_correct=f, has_reflection=f)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = RewardConfig(preset="my_user_reward:length_only")
    assert cfg.resolved_preset == "my_user_reward:length_only"
    out = score_batch(["abc", "de"], ["1", "2"], cfg, device="cpu")
    assert out.total.tolist() == [3.0, 2.0]
    import my_user_reward

    assert my_user_reward.calls == [(["abc", "de"], ["1", "2"], None, "cpu")]


@pytest.mark.parametrize("preset,match", [
    ("no_such_module_xyz:fn", "cannot import module"),
    ("srpo_fast.reward.srpo:not_there", "no callable"),
])
def test_bad_module_paths_fail_clearly(preset, match):
    with pytest.raises(ValueError, match=match):  # resolved when the config is built, not at the first step
        RewardConfig(preset=preset)


def test_unknown_presets_are_config_errors():
    for bad in ("definitely_not_a_preset", "a:b:c", ":fn", ""):
        with pytest.raises(ValueError, match="preset"):
            RewardConfig(preset=bad)
    assert reward_function("srpo_paper").func.__name__ == "score_preset"


def test_public_names_resolve():
    import srpo_fast.reward as reward

    for name in reward.__all__:
        assert getattr(reward, name) is not None, name
    with pytest.raises(AttributeError):
        reward.not_a_name  # noqa: B018
    with pytest.raises(AttributeError):
        reward.register_reward  # noqa: B018  (the decorator registry is gone: a preset or "module:function")
