"""Reward registry: built-ins, @register_reward and "module:function" paths, all reached from RewardConfig."""
import pytest
import torch

from srpo_fast.reward import RewardConfig, available_rewards, get_reward, register_reward, score_batch
from srpo_fast.reward.srpo import RewardOutput


def _constant(responses, value):
    t = torch.full((len(responses),), value)
    f = torch.zeros(len(responses), dtype=torch.bool)
    return RewardOutput(total=t, format=t * 0, accuracy=t, reflection_format=t * 0, effectiveness=t * 0,
                        length=t * 0, first_correct=f, second_correct=f, has_reflection=f)


def test_builtins_and_aliases():
    assert {"srpo_paper", "srpo_official", "r1"} <= set(available_rewards())
    assert RewardConfig(preset="paper").resolved_preset == "srpo_paper"
    assert RewardConfig(preset="srpo_official").resolved_preset == "srpo_official"
    assert get_reward("srpo_paper").__name__ == "srpo_paper"


def test_register_and_use():
    calls = []

    @register_reward("test_constant_reward")
    def constant(responses, answers, *, config, options=None, device=None, **kwargs):
        calls.append((list(responses), list(answers), options, device))
        return _constant(responses, 0.75)

    out = score_batch(["x", "y"], ["1", "2"], RewardConfig(preset="test_constant_reward"), device="cpu")
    assert out.total.tolist() == [0.75, 0.75]
    assert calls == [(["x", "y"], ["1", "2"], None, "cpu")]
    assert "test_constant_reward" in available_rewards()


def test_module_path(tmp_path, monkeypatch):
    (tmp_path / "my_user_reward.py").write_text(
        "import torch\n"
        "from srpo_fast.reward.srpo import RewardOutput\n"
        "def length_only(responses, answers, *, config, **kwargs):\n"
        "    t = torch.tensor([float(len(r)) for r in responses])\n"
        "    f = torch.zeros(len(responses), dtype=torch.bool)\n"
        "    z = t * 0\n"
        "    return RewardOutput(total=t, format=z, accuracy=z, reflection_format=z, effectiveness=z,\n"
        "                        length=t, first_correct=f, second_correct=f, has_reflection=f)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = score_batch(["abc", "de"], ["1", "2"], RewardConfig(preset="my_user_reward:length_only"))
    assert out.total.tolist() == [3.0, 2.0]


@pytest.mark.parametrize("preset,match", [
    ("no_such_module_xyz:fn", "cannot import module"),
    ("srpo_fast.reward.srpo:not_there", "no callable"),
])
def test_bad_module_paths_fail_clearly(preset, match):
    cfg = RewardConfig(preset=preset)  # shaped right: accepted until first use
    with pytest.raises(ValueError, match=match):
        score_batch(["x"], ["1"], cfg)


def test_registration_errors():
    with pytest.raises(ValueError, match="built-in"):
        register_reward("srpo_paper")
    with pytest.raises(ValueError, match="name"):
        register_reward("a:b")
    with pytest.raises(TypeError, match="callable"):
        register_reward("test_not_callable")(42)
    with pytest.raises(ValueError, match="unknown reward"):
        get_reward("definitely_not_registered")


def test_public_names_resolve():
    import srpo_fast.reward as reward

    for name in reward.__all__:
        assert getattr(reward, name) is not None, name
    with pytest.raises(AttributeError):
        reward.not_a_name  # noqa: B018
