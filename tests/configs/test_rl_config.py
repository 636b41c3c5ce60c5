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


@pytest.mark.parametrize("stage", ["grpo", "ppo"])
def test_a_reward_folder_that_is_not_there_yet_is_said_as_such(stage, tmp_path, monkeypatch):
    """examples/ppo_rm_tiny.yaml before examples/rm_tiny.yaml: the reward folder is missing, which was said as
    "neither a built-in, a module:function nor an existing rm output folder", not naming where it looked."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as e:
        load_train_config(None, [f"stage={stage}", "data.train=[x]", f"{stage}.reward={{outputs/rm_tiny: 1.0}}"])
    msg = str(e.value)
    assert "names the folder `outputs/rm_tiny`, which does not exist" in msg and str(tmp_path) in msg
    assert "train the reward model first" in msg
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError) as e:  # a file of the reward model, not its folder
        load_train_config(None, [f"stage={stage}", "data.train=[x]", f"{stage}.reward={{./model.safetensors: 1}}"])
    assert "names the file `./model.safetensors`; a reward model is a folder" in str(e.value)


def test_a_misspelled_built_in_reward_gets_the_name_it_meant():
    with pytest.raises(ConfigError) as e:
        load_train_config(None, ["stage=grpo", "data.train=[x]", "grpo.reward={exact_matc: 1.0}"])
    assert "Did you mean `exact_match`?" in str(e.value)


@pytest.mark.parametrize("stage", ["grpo", "ppo"])
def test_rewards_all_weighted_zero_are_refused(stage):
    """Every completion scored 0: GRPO's groups all constant, PPO learning from the KL penalty alone, and the run
    said "done" as if it had trained on the reward."""
    with pytest.raises(ConfigError) as e:
        load_train_config(None, [f"stage={stage}", "data.train=[x]", f"{stage}.reward={{length: 0, format: 0}}"])
    assert f"`{stage}.reward` weighs every reward 0 (length, format)" in str(e.value)
    cfg = load_train_config(None, [f"stage={stage}", "data.train=[x]", f"{stage}.reward={{length: 1, format: 0}}"])
    assert getattr(cfg, stage).reward == {"length": 1.0, "format": 0.0}  # a 0 beside others: logged, not trained on
