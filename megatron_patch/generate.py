"""``python -m megatron_patch.generate --load CKPT --input-file IN --output-file OUT [...]``

Completes every prompt of IN with the Megatron checkpoint CKPT and writes JSON lines to OUT
(``prompt``, ``prompt_format``, ``completion``, ``completion_ids``, ``finish_reason``). Prompts
are wrapped as SFT formatted them with ``--prompt-format alpaca|chat`` (default: the format an
SFT checkpoint records, else ``raw``; generation/prompt_format.py). Under ``torchrun`` with
``--tensor-model-parallel-size T`` each group of T ranks holds one copy of the model; the
copies share the micro-batches. ``--help`` lists the flags.
"""
from __future__ import annotations

import sys

from megatron_patch import compat
from megatron_patch.generation import cli
from megatron_patch.generation.cli import log
from megatron_patch.generation.engine import Limits, build_backend
from megatron_patch.generation.loading import (load_model, load_tokenizer, open_checkpoint,
                                               size_mismatch)
from megatron_patch.generation.prompt_format import (check_prompt_fields, encode_prompts,
                                                     resolve_prompt_format)
from megatron_patch.generation.prompts import (check_output_path, read_prompts, truncate_left,
                                               write_completions)
from megatron_patch.generation.schedule import generate_all

MAX_TRUNCATION_WARNINGS = 5




def tokenize_prompts(tokenizer, prompts, limit: int, prompt_format: str) -> list[list[int]]:
    """Token ids of the prompts in ``prompt_format``, long ones cut from the left to ``limit``
    tokens (warned)."""
    ids, cut = truncate_left(encode_prompts(tokenizer, prompts, prompt_format), limit)
    for index in cut[:MAX_TRUNCATION_WARNINGS]:
        log(f"warning: {prompts.where(index)}: prompt longer than {limit} "
            f"tokens, truncated from the left")
    if cut:
        log(f"warning: {len(cut)} of {len(ids)} prompts were truncated from the left to "
            f"{limit} tokens (--seq-length minus --max-new-tokens, or --max-prompt-length)")
    return ids


def completion_records(prompts, completions, tokenizer, prompt_format: str) -> list[dict]:
    """Output records in input order: the prompt as given (unwrapped; a chat's last turn, its
    ``messages`` alongside); the completion text leaves out the final EOS."""
    records = []
    for text, messages, completion in zip(prompts.texts, prompts.messages, completions):
        ids = completion.ids[:-1] if completion.finish_reason == "eos" else completion.ids
        record = {"prompt": text, "prompt_format": prompt_format}
        if messages is not None:
            record["messages"] = messages
        record.update(completion=tokenizer.detokenize(ids), completion_ids=completion.ids,
                      finish_reason=completion.finish_reason)
        if completion.logprobs is not None:
            record["completion_logprobs"] = completion.logprobs
        records.append(record)
    return records


def run(opts) -> None:
    """Everything that can fail on bad input runs before torch.distributed starts."""
    prompts = read_prompts(opts.input_file)
    check_output_path(opts.output_file)
    checkpoint = open_checkpoint(opts.load)
    warning = size_mismatch(checkpoint, opts.model_size)
    if warning:
        log(warning)
    prompt_format, source = resolve_prompt_format(opts.prompt_format, checkpoint.meta, opts.load)
    for line in check_prompt_fields(prompts, prompt_format):
        log(line)
    tokenizer = load_tokenizer(checkpoint, opts.tokenizer_path, opts.tokenizer_type)
    seq_length, limit = cli.prompt_limit(opts, checkpoint.args.max_position_embeddings)
    if prompts.skipped_empty:
        log(f"[generate] skipped {prompts.skipped_empty} empty lines of {prompts.path}")
    log(f"[generate] prompt format {prompt_format} ({source})")
    special = checkpoint.args.prefix_lm_ids
    ids = tokenize_prompts(tokenizer, prompts, limit - 2 if special else limit, prompt_format)
    eos = tokenizer.eod
    if special:  # GLM: prompts end "[gMASK] <sop>" as its tokenizers end them; stop at <eop>
        from megatron_patch.layers.glm_positions import prompt_ids

        ids = [prompt_ids(row, special) for row in ids]
        eos = special["eop"]
        log(f"[generate] GLM prefix-LM: prompts end with [gMASK] ({special['gmask']}) <sop> "
            f"({special['sop']}); stopping at <eop> ({eos})")
    pad = tokenizer.pad if tokenizer.pad is not None else 0
    limits = Limits(opts.max_new_tokens, eos, pad, checkpoint.args.vocab_size,
                    opts.output_logprobs)
    compat.initialize_parallel(opts.tensor_model_parallel_size, 1, seed=opts.seed)
    try:
        model = load_model(checkpoint, opts.tensor_model_parallel_size, opts.precision)
        backend = build_backend(opts.inference_backend, model, seq_length, opts.decode_kernels)
        log(f"[generate] {len(ids)} prompts, backend {type(backend).__name__}, "
            f"micro-batch {opts.micro_batch_size}, {opts.precision}")
        completions = generate_all(backend, ids, opts.sampling, limits, opts.micro_batch_size,
                                   opts.seed, log)
        if completions is not None:
            write_completions(opts.output_file,
                              completion_records(prompts, completions, tokenizer,
                                                 prompt_format))
            log(f"[generate] wrote {len(completions)} completions to {opts.output_file}")
    finally:
        compat.destroy_parallel()


def main(argv=None) -> int:
    """Exit code: 0 done, 1 bad input (message on stderr), 2 bad flags (usage)."""
    return cli.run_command(cli.parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
