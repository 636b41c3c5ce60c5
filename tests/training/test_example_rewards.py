"""The example reward functions (examples/rl_rewards.py) that the GRPO/PPO examples and real-model proofs use."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from examples.rl_rewards import short_and_right  # noqa: E402


def test_short_and_right_cannot_be_won_by_saying_nothing():
    """An empty or short wrong reply scores the same as a long wrong one (with a length penalty there, GRPO on
    SmolLM2 learned to answer with nothing); containing the answer beats any wrong reply, and shorter beats longer."""
    wrong = [short_and_right(text, reference="42") for text in ("", "no", "I think the answer is 41, " * 5)]
    assert wrong == [-0.1, -0.1, -0.1]
    long_right = short_and_right("Let me see: 40 + 2 is 42, so the answer is 42.", reference="42")
    short_right = short_and_right("It is 42.", reference="42")
    assert max(wrong) < long_right < short_right < short_and_right("42", reference="42") == 1.0
