"""Python reward functions for the RL examples (grpo_tiny.yaml, ppo_tiny.yaml): `reward: {examples.rl_rewards:NAME: 1}`.

A reward function takes the completion text and any of the keywords prompt (the messages), reference (the row's
answer or None) and completion_ids (the sampled token ids), and returns a number.
"""


def digit_share(completion: str, **_) -> float:
    """Share of the completion's characters that are digits: a reward even a random tiny model can learn."""
    return sum(ch.isdigit() for ch in completion) / max(len(completion), 1)


def short_and_right(completion: str, reference: str | None = None, **_) -> float:
    """1 for exactly the reference answer, 0.5 when the answer appears inside a longer reply, minus 0.002 per
    character beyond the answer's length, -0.1 for any reply without it (flat: with a length penalty there too, the
    policy learned to say nothing, measured on SmolLM2): partial credit that a chatty instruct model can climb (the real-model
    demo; plain exact_match gives a group of all-wrong chatty replies nothing to compare)."""
    from tuneforge.data.example_task import exact_match, normalize_answer

    if reference is None:
        raise ValueError("short_and_right needs the row's reference answer")
    answer = normalize_answer(reference)
    if exact_match(completion, reference):
        return 1.0
    if not (answer and answer in completion):
        return -0.1  # flat: a short wrong reply (or an empty one) must not beat a long wrong one
    return 0.5 - 0.002 * max(0, len(completion) - len(answer))
