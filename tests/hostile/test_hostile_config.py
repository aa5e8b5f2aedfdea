"""Config values that used to pass the load and then failed inside step 1 (after its rollout), or ran silently
wrong: non-finite floats anywhere, out-of-range clips, bucket sizes, grad norms, pixel bounds, top_k, negative
coefficients, an empty output dir, a "module:function" reward that is not a reward. Each is a ConfigError naming
the key at load time, through the real CLI entry as well (exit code 2, no traceback)."""
from __future__ import annotations

import dataclasses
import subprocess
import types
import sys
import typing

import pytest

from srpo_fast.config import Config, ConfigError, load_config
from srpo_fast.distill.config import DistillConfig, load_distill_config

pytestmark = pytest.mark.timeout(60)


def float_keys(cls, prefix=""):
    """Every float (or float | None) field of a config dataclass tree, as dotted keys."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        annotation, key = hints[f.name], f"{prefix}{f.name}"
        if dataclasses.is_dataclass(annotation):
            yield from float_keys(annotation, key + ".")
        elif annotation is float or (typing.get_origin(annotation) in (typing.Union, types.UnionType)
                                      and float in typing.get_args(annotation)):
            yield key


@pytest.mark.parametrize("loader,cls", [(load_config, Config), (load_distill_config, DistillConfig)])
@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "nan"])
def test_every_float_key_rejects_non_finite_values(loader, cls, value):
    keys = list(float_keys(cls))
    assert len(keys) > 10
    for key in keys:
        with pytest.raises(ConfigError, match=f"{key} must be a finite number"):
            loader(None, [f"{key}={value}"])


def test_float_lists_reject_non_finite_items():
    with pytest.raises(ConfigError, match=r"train.adam_betas\[0\] must be a finite number"):
        load_config(None, ["train.adam_betas=[.nan, 0.9]"])


@pytest.mark.parametrize("override,message", [
    ("rollout.sync_bucket_mb=0", "rollout.sync_bucket_mb must be > 0"),
    ("train.max_grad_norm=-1", "train.max_grad_norm must be > 0"),
    ("algo.clip_low=2", r"algo.clip_low must be in \[0, 1\)"),
    ("algo.clip_low=1", r"algo.clip_low must be in \[0, 1\)"),
    ("algo.clip_high=-0.1", "algo.clip_high must be >= 0"),
    ("algo.kl_coef=-0.5", "algo.kl_coef must be >= 0"),
    ("algo.entropy_coef=-1", "algo.entropy_coef must be >= 0"),
    ("train.weight_decay=-0.1", "train.weight_decay must be >= 0"),
    ("rollout.top_k=-5", "rollout.top_k must be -1 or 0"),
    ("rollout.kv_cache_gb=0", "rollout.kv_cache_gb must be > 0"),
    ("model.max_pixels=0", "model.max_pixels must be > 0"),
    ("train.output_dir=", "train.output_dir is empty"),
    ("train.output_dir='  '", "train.output_dir is empty"),
    ("reward.preset=os:system", r"reward.preset: reward 'os:system'.*cannot take score_batch's arguments"),
    ("reward.preset=json:nope", r"reward.preset: reward 'json:nope'.*no callable 'nope'"),
    ("reward.preset=no_such_module_xyz:f", r"reward.preset: reward .*cannot import module"),
])
def test_values_that_failed_in_step_one_fail_at_load(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_pixel_bounds_must_be_ordered():
    with pytest.raises(ConfigError, match=r"model.min_pixels \(5000\) must be <= model.max_pixels \(4000\)"):
        load_config(None, ["model.min_pixels=5000", "model.max_pixels=4000"])
    with pytest.raises(ConfigError, match="policy.min_pixels"):
        load_distill_config(None, ["policy.min_pixels=5000", "policy.max_pixels=4000"])
    assert load_config(None, ["model.min_pixels=4000", "model.max_pixels=4000"]).model.min_pixels == 4000


def test_a_module_function_reward_is_resolved_and_checked_at_load(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def good(responses, answers, *, config, **kwargs):\n    return None\n"
        "def positional_only(responses, answers):\n    return None\n"
        "raise_on_import = None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_config(None, ["reward.preset=my_rewards:good"]).reward.preset == "my_rewards:good"
    with pytest.raises(ConfigError, match="cannot take score_batch's arguments"):
        load_config(None, ["reward.preset=my_rewards:positional_only"])
    with pytest.raises(ConfigError, match="no callable 'raise_on_import'"):
        load_config(None, ["reward.preset=my_rewards:raise_on_import"])


def test_the_cli_reports_a_nan_as_a_config_error_before_loading_anything():
    proc = subprocess.run([sys.executable, "-m", "srpo_fast.train", "rollout.temperature=.nan"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "config error: rollout.temperature must be a finite number" in proc.stderr
    assert "Traceback" not in proc.stderr
