"""Rule rewards for rlhf.reward_fn (``module:function``; this directory is the working_dir, so
``rules:letter_e`` imports this file). A function takes the response text (or the prompt and
the response) and returns a float."""


def letter_e(response: str) -> float:
    """The share of the letter "e" in the response: a synthetic task a random model can learn."""
    return response.count("e") / max(len(response), 1)
