"""Config loading: YAML + dotted overrides, with errors that name the key."""
import pytest

from srpo_fast.config import Config, ConfigError, load_config, parse_override, save_config


def test_defaults_are_the_paper_recipe():
    cfg = load_config()
    assert (cfg.rollout.n, cfg.rollout.temperature, cfg.train.lr, cfg.train.epochs) == (8, 1.0, 1e-6, 3)
    assert cfg.train.prompts_per_step == 128 and cfg.model.freeze_vision
    assert (cfg.algo.filter_low, cfg.algo.filter_high) == (0.1, 0.9)
    assert cfg.reward.preset == "paper" and cfg.reward.length_alpha == 0.1


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("algo:\n  clip_high: 0.25\nrollout:\n  n: 4\nreward:\n  preset: official\n")
    cfg = load_config(path, ["algo.clip_high=0.28", "data.train_files=[a.jsonl, b.jsonl]", "algo.dual_clip=3"])
    assert cfg.algo.clip_high == 0.28 and cfg.rollout.n == 4 and cfg.reward.preset == "official"
    assert cfg.data.train_files == ["a.jsonl", "b.jsonl"] and cfg.algo.dual_clip == 3.0
    assert isinstance(cfg.algo.dual_clip, float)


@pytest.mark.parametrize("override, fragment", [
    ("algo.clip_hgh=0.3", "algo.clip_hgh"),
    ("nosuch.key=1", "unknown config key nosuch"),
    ("algo.clip_high=wide", "algo.clip_high must be float"),
    ("rollout.n=2.5", "rollout.n must be int"),
    ("rollout.n=true", "rollout.n must be int"),
    ("model.freeze_vision=3", "model.freeze_vision must be bool"),
    ("rollout.engine=sglang", "rollout.engine must be one of"),
    ("reward.preset=nope", "reward.preset"),
    ("reward.length_alpha=-1", "reward.length_alpha"),
    ("algo.filter_low=0.95", "algo.filter_low"),
    ("train.lr=null", "train.lr must be float, got NoneType"),
    ("algo=1", "algo must be a mapping"),
    ("noequals", "must look like section.key=value"),
    ("model.tiny_language_std=0", "model.tiny_language_std must be in"),
    ("model.tiny_language_std=big", "model.tiny_language_std must be float"),
])
def test_bad_overrides_name_the_key(override, fragment):
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.")):
        load_config(None, [override])


def test_bad_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("algo: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(listy)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    typo = tmp_path / "typo.yaml"
    typo.write_text("train:\n  learning_rate: 1e-5\n")
    with pytest.raises(ConfigError, match=r"train\.learning_rate"):
        load_config(typo)


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(None, ["algo.clip_high=0.28", "reward.preset=official", "model.max_pixels=12544"])
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    again = load_config(path)
    assert again == cfg and isinstance(again, Config)


def test_override_values_are_yaml():
    assert parse_override("a.b=null") == (["a", "b"], None)
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])
    assert parse_override("a.b=x=y") == (["a", "b"], "x=y")


def test_exponent_floats_without_a_dot_are_numbers(tmp_path):
    """PyYAML reads `1e-6` (no dot) as a string; float keys must still take it, from a file and an override."""
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 1e-6\n")
    assert load_config(path).train.lr == 1e-6
    assert load_config(None, ["train.lr=3e-3"]).train.lr == 3e-3
    with pytest.raises(ConfigError, match="train.lr must be float"):
        load_config(None, ["train.lr=fast"])


def test_bare_on_off_switches_read_as_yaml_booleans_still_work():
    assert load_config(None, ["log.tensorboard=off"]).log.tensorboard == "off"
    assert load_config(None, ["log.tensorboard=on"]).log.tensorboard == "on"
    with pytest.raises(ConfigError, match="log.tensorboard"):
        load_config(None, ["log.tensorboard=sometimes"])


def test_every_shipped_config_loads():
    from pathlib import Path

    configs = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))
    assert len(configs) >= 4
    for path in configs:
        if path.name.startswith("distill_"):  # stage-1 data construction, not a trainer config
            from srpo_fast.distill import load_distill_config

            load_distill_config(path)
            continue
        assert load_config(path).train.stage in ("sft", "grpo"), path


def test_validation_needs_validation_files_for_real_data():
    with pytest.raises(ConfigError, match="data.val_files"):
        load_config(None, ["train.val_every=5", "data.train_files=[a.jsonl]"])
    assert load_config(None, ["train.val_every=5"]).train.val_every == 5  # synthetic: held-out synthetic set
    with pytest.raises(ConfigError, match="train.val_every"):
        load_config(None, ["train.val_every=-1"])


def test_longest_prompt_plus_response_must_fit_the_engine():
    with pytest.raises(ConfigError, match="rollout.max_model_len"):
        load_config(None, ["data.max_prompt_tokens=3000", "rollout.max_tokens=2048", "rollout.max_model_len=4096"])
    cfg = load_config(None, ["data.max_prompt_tokens=2048", "rollout.max_tokens=2048", "rollout.max_model_len=4096"])
    assert cfg.rollout.max_model_len == 4096


def test_overrides_a_shipped_config_suggests_load():
    """A comment like `# vllm works too (rollout.engine=vllm k=v ...)` in a shipped config is advice users paste:
    each such override set must pass the config's own checks together with the file."""
    import re
    from pathlib import Path

    suggestions = 0
    for path in sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml")):
        for group in re.findall(r"\(((?:[\w.]+=\S+\s*)+)\)", path.read_text()):
            load_config(path, group.split())
            suggestions += 1
    assert suggestions >= 1  # demo_cpu.yaml's vLLM switch


def test_synthetic_tasks_pick_the_generated_records():
    from srpo_fast.train.run import load_train_records

    cfg = load_config(None, ["data.synthetic_tasks=[compare]", "data.synthetic_size=6"])
    assert {r["task"] for r in load_train_records(cfg)} == {"compare"}
    with pytest.raises(ConfigError, match=r"data.synthetic_tasks .*'spin'"):
        load_config(None, ["data.synthetic_tasks=[compare, spin]"])
    with pytest.raises(ConfigError, match="data.synthetic_tasks"):
        load_config(None, ["data.synthetic_tasks=[]"])
