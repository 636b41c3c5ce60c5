"""The `grpo:` / `ppo:` sections: their sampling settings go through the engine's one check (SamplingParams)."""

from __future__ import annotations

import pytest

from tuneforge.configs.schema import load_train_config
from tuneforge.errors import ConfigError
from tuneforge.inference import SamplingParams


@pytest.mark.parametrize("stage", ["grpo", "ppo"])
def test_rollout_sampling_is_checked_by_the_engines_check_all_at_once(stage):
    """rl_problems repeated the ranges of SamplingParams.validate (and let an infinite temperature through, which
    the engine then refused mid-run); each bad setting is now reported at once, as the engine words it."""
    bad = {"temperature": float("inf"), "top_p": 0.0, "top_k": -1, "max_new_tokens": 0}
    with pytest.raises(ConfigError) as e:
        load_train_config(None, [f"stage={stage}", "data.train=[x]", f"{stage}.temperature=.inf",
                                 f"{stage}.top_p=0", f"{stage}.top_k=-1", f"{stage}.max_new_tokens=0"])
    for key in bad:
        assert f"`{stage}.{key}`" in str(e.value)
    engine_says = SamplingParams(**bad).problems(spell=lambda name: f"{stage}.{name}")
    assert len(engine_says) == len(bad)
    for sentence in engine_says:
        assert sentence.removesuffix(".") in str(e.value)  # the config adds where each key was set


@pytest.mark.parametrize("temperature", ["0", "-1"])
def test_a_temperature_of_zero_or_below_is_refused_once_in_rls_words(temperature):
    """0 is valid for chat and serve (greedy) but teaches RL nothing; below 0 is said the same way, not also as the
    engine's ">= 0", which would send the user to 0 and a second error."""
    with pytest.raises(ConfigError) as e:
        load_train_config(None, ["stage=grpo", "data.train=[x]", f"grpo.temperature={temperature}"])
    assert "`grpo.temperature` must be > 0: greedy rollouts" in str(e.value)
    assert "Sampling parameter `grpo.temperature`" not in str(e.value)
