"""Python reward functions for the RL examples (grpo_tiny.yaml, ppo_tiny.yaml): `reward: {examples.rl_rewards:NAME: 1}`.

A reward function takes the completion text and any of the keywords prompt (the messages), reference (the row's
answer or None) and completion_ids (the sampled token ids), and returns a number.
"""


def digit_share(completion: str, **_) -> float:
    """Share of the completion's characters that are digits: a reward even a random tiny model can learn."""
    return sum(ch.isdigit() for ch in completion) / max(len(completion), 1)


def short_and_right(completion: str, reference: str | None = None, **_) -> float:
    """1 for the exact reference answer, minus a little per character beyond it (the real-model demo)."""
    from tuneforge.data.example_task import exact_match

    right = reference is not None and exact_match(completion, reference)
    return float(right) - 0.001 * max(0, len(completion) - len(reference or ""))
