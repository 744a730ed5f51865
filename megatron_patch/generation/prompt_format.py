"""``--prompt-format raw|alpaca|chat``: prompts wrapped as SFT formatted its samples.

A model fine-tuned on Alpaca prompts or on chat turns answers a bare question badly (issue 11:
empty completions on 6 of 6 raw prompts, right on 6 of 6 wrapped ones), so generation feeds it
the prompt part of an SFT sample:

- ``raw``: the text as it is (``tokenizer.tokenize``: the tokenizer's own special tokens).
- ``alpaca``: SFT's Alpaca prompt (``megatron_patch.data.sft``'s two templates) around the
  prompt as the instruction; a JSON line's ``input`` selects the with-input template.
- ``chat``: ``[{"role": "user", "content": prompt}]`` (or a JSON line's ``messages``) rendered
  with the tokenizer's chat template and its generation prompt (``add_generation_prompt=True``),
  or SFT's documented fallback header when the tokenizer has no template.

The ids are SFT's own: the record is encoded by ``megatron_patch.data.sft.encode_record`` with a
placeholder response, and the ids before the response (the part SFT does not learn) are the
prompt. SFT tokenizes each piece of a sample on its own, so tokenizing the wrapped text in one
call could differ at a piece boundary; this cannot.

The default is the ``prompt_format`` an SFT checkpoint records in its megatron_patch.json, else
``raw``.
"""
from __future__ import annotations

from megatron_patch.data import sft

FORMATS = ("raw", "alpaca", "chat")
DEFAULT_FORMAT = "raw"
# Any non-empty text: the ids before the response do not depend on it (SFT renders and
# tokenizes the prompt pieces without the response).
_PLACEHOLDER_RESPONSE = "x"


def resolve_prompt_format(flag: str | None, meta: dict, load: str) -> tuple[str, str]:
    """(format, where it came from): ``--prompt-format``, else the checkpoint's recorded one,
    else raw. A recorded value that is not a format is a ValueError naming the file."""
    if flag:
        return flag, "--prompt-format"
    recorded = meta.get("prompt_format")
    if recorded is None:
        return DEFAULT_FORMAT, "default: the checkpoint records none"
    if recorded not in FORMATS:
        raise ValueError(f"--load {load!r}: its megatron_patch.json has prompt_format "
                         f"{recorded!r}, not one of {', '.join(FORMATS)}; pass --prompt-format")
    return recorded, "the checkpoint's metadata"


def sft_record(prompt_format: str, text: str, extra: str | None, messages: list | None) -> dict:
    """The SFT record whose prompt part is this prompt (with a placeholder response)."""
    if prompt_format == "alpaca":
        return {"instruction": text, "input": extra or "", "output": _PLACEHOLDER_RESPONSE}
    turns = messages if messages is not None else [{"role": "user", "content": text}]
    return {"messages": [*turns, {"role": "assistant", "content": _PLACEHOLDER_RESPONSE}]}


def encode_prompt(tokenizer, prompt_format: str, text: str, extra: str | None = None,
                  messages: list | None = None) -> list[int]:
    """Token ids of one prompt in ``prompt_format``: for alpaca and chat, SFT's ids of the
    sample up to where its response starts."""
    if prompt_format == "raw":
        return list(tokenizer.tokenize(text))
    ids, learned = sft.encode_record(sft_record(prompt_format, text, extra, messages), tokenizer)
    # Everything from the response on is learned; the prompt ends at the last unlearned id.
    start = int((learned == 0).nonzero()[0][-1]) + 1
    return ids[:start].tolist()


def check_prompt_fields(prompts, prompt_format: str) -> list[str]:
    """Refuse ``messages`` outside the chat format (ValueError naming the file and line); return
    warnings for ``input`` fields that the format does not use."""
    for index, messages in enumerate(prompts.messages):
        if messages is not None and prompt_format != "chat":
            raise ValueError(f"{prompts.where(index)}: a 'messages' record needs "
                             f"--prompt-format chat (the format is {prompt_format})")
    unused = sum(extra is not None for extra in prompts.inputs) if prompt_format != "alpaca" else 0
    if unused:
        return [f"warning: {unused} prompts of {prompts.path} carry an 'input' field, which only "
                f"--prompt-format alpaca uses (the format is {prompt_format}): ignored"]
    return []


def encode_prompts(tokenizer, prompts, prompt_format: str) -> list[list[int]]:
    """Ids of every prompt of a ``PromptSet``; a record SFT's encoding refuses (a malformed
    ``messages``) is a ValueError naming its file and line."""
    if prompt_format == "raw":
        return tokenizer.tokenize_batch(prompts.texts)
    ids = []
    for index, (text, extra, messages) in enumerate(zip(prompts.texts, prompts.inputs,
                                                        prompts.messages)):
        try:
            ids.append(encode_prompt(tokenizer, prompt_format, text, extra, messages))
        except ValueError as err:
            raise ValueError(f"{prompts.where(index)}: {err}") from None
    return ids
