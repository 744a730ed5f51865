"""Command-line flags of ``python -m megatron_patch.generate`` (Megatron-LM's names where it has
the concept) and their validation: every bad value is refused before anything is loaded, with
the flag named."""
from __future__ import annotations

import argparse
import os
import sys

from megatron_patch import compat
from megatron_patch.argtypes import positive_int
from megatron_patch.generation import decode_kernels
from megatron_patch.generation.engine import BACKENDS, backend_name
from megatron_patch.generation.prompt_format import FORMATS
from megatron_patch.generation.sampling import SamplingParams

BACKEND_CHOICES = ("auto", *BACKENDS)


def build_parser() -> argparse.ArgumentParser:
    """The flags, grouped as ``--help`` shows them."""
    parser = argparse.ArgumentParser(
        prog="python -m megatron_patch.generate",
        description="Complete prompts with a Megatron checkpoint (KV cache, top-k / top-p "
                    "sampling, tensor parallel under torchrun). Output: JSON lines with "
                    "prompt, prompt_format, completion, completion_ids, finish_reason (and "
                    "completion_logprobs with --output-logprobs).")
    io = parser.add_argument_group("files")
    io.add_argument("--load", required=True, help="Megatron checkpoint (root or iteration dir)")
    io.add_argument("--input-file", required=True,
                    help="one prompt per line, or .jsonl/.json with a 'query' field per line "
                         "(and optionally 'input'; or 'messages' instead, for chat)")
    io.add_argument("--output-file", required=True, help="JSON lines, one per prompt")
    io.add_argument("--prompt-format", choices=FORMATS,
                    help="wrap each prompt as SFT formatted its samples: raw (as it is), alpaca "
                         "(the Alpaca prompt; a JSON line's 'input' picks the with-input one), "
                         "chat (a user turn, or a JSON line's 'messages', in the tokenizer's chat "
                         "template with its generation prompt; SFT's fallback header without "
                         "one). Default: the checkpoint's recorded prompt_format (an SFT "
                         "checkpoint's), else raw")
    io.add_argument("--output-logprobs", action="store_true",
                    help="add completion_logprobs: each new token's log-probability under the "
                         "model (log softmax of its logits over the true vocabulary, before "
                         "temperature, top-k/p and the repetition penalty)")
    io.add_argument("--tokenizer-path", help="tokenizer directory or model file (default: the "
                                             "checkpoint's tokenizer/)")
    io.add_argument("--tokenizer-type", help="megatron_patch.tokenizers name (default: the "
                                             "checkpoint's, else the family's)")
    io.add_argument("--model-size", help="expected MODEL_SIZE row of the family; only checked "
                                         "against the checkpoint (its metadata gives the shape)")
    sampling = parser.add_argument_group("sampling (top-k and top-p: one of them must be 0)")
    sampling.add_argument("--top-k", type=int, default=0, help="1 = greedy; 0 = off")
    sampling.add_argument("--top-p", type=float, default=0.0, help="nucleus mass; 0 = off")
    sampling.add_argument("--temperature", type=float, default=1.0)
    sampling.add_argument("--repetition-penalty", type=float, default=1.0,
                          help="> 1 lowers tokens already present; 1 = off")
    sampling.add_argument("--seed", type=int, default=1234, help="for reproducible sampling")
    lengths = parser.add_argument_group("lengths and batching")
    lengths.add_argument("--max-new-tokens", "--out-seq-length", type=positive_int, default=128)
    lengths.add_argument("--seq-length", type=positive_int,
                         help="prompt + new tokens (default: max_position_embeddings)")
    lengths.add_argument("--max-prompt-length", type=positive_int,
                         help="longer prompts lose tokens on the left (default: seq-length - "
                              "max-new-tokens)")
    lengths.add_argument("--micro-batch-size", type=positive_int, default=1)
    model = parser.add_argument_group("model")
    model.add_argument("--tensor-model-parallel-size", type=positive_int, default=1)
    model.add_argument("--pipeline-model-parallel-size", type=positive_int, default=1,
                       help="only 1: generation runs the whole model on each rank")
    model.add_argument("--bf16", action="store_true")
    model.add_argument("--fp16", action="store_true")
    model.add_argument("--inference-backend", choices=BACKEND_CHOICES, default="auto",
                       help="KV cache: mcore (megatron-core StaticInferenceContext; the default "
                            "on CPU and under TP > 1), static (ours, eager), graph (ours + CUDA "
                            "graphs; the default on one GPU), graph-compiled (+ torch.compile: "
                            "fastest, compiles per batch size and 128-token window), uncached")
    model.add_argument("--decode-kernels", choices=decode_kernels.CHOICES, default="auto",
                       help="Triton matrix-vector and flash-decoding kernels for decode steps of "
                            "our static cache at batch 1 (auto: on with the graph backends when "
                            "Triton is installed; on: also with --inference-backend static)")
    return parser


def sampling_params(opts: argparse.Namespace) -> SamplingParams:
    """The sampling flags, checked (ValueError naming the flag)."""
    return SamplingParams(top_k=opts.top_k, top_p=opts.top_p, temperature=opts.temperature,
                          repetition_penalty=opts.repetition_penalty)


def parse_args(argv=None) -> argparse.Namespace:
    """Parsed and checked flags; exits with a usage message naming the bad flag."""
    parser = build_parser()
    opts = parser.parse_args(argv)
    try:
        opts.sampling = sampling_params(opts)
    except ValueError as err:
        parser.error(str(err))
    if opts.pipeline_model_parallel_size != 1:
        parser.error("--pipeline-model-parallel-size must be 1 for generation (use tensor "
                     "parallelism)")
    if opts.bf16 and opts.fp16:
        parser.error("--bf16 and --fp16 are exclusive")
    opts.precision = "bf16" if opts.bf16 else "fp16" if opts.fp16 else "fp32"
    try:
        backend = backend_name(opts.inference_backend, compat.device(),
                               opts.tensor_model_parallel_size)
        decode_kernels.resolve(opts.decode_kernels, compat.device(), backend)
    except ValueError as err:
        parser.error(str(err))
    if opts.seq_length is not None and opts.seq_length <= opts.max_new_tokens:
        parser.error(f"--seq-length {opts.seq_length} leaves no room for a prompt with "
                     f"--max-new-tokens {opts.max_new_tokens}")
    return opts


def prompt_limit(opts: argparse.Namespace, max_position_embeddings: int) -> tuple[int, int]:
    """(sequence length, longest prompt kept) once the checkpoint's shape is known."""
    seq_length = opts.seq_length or max_position_embeddings
    if seq_length > max_position_embeddings:
        raise ValueError(f"--seq-length {seq_length} is longer than the model's "
                         f"max_position_embeddings {max_position_embeddings}; shorten it")
    if seq_length <= opts.max_new_tokens:
        raise ValueError(f"--max-new-tokens {opts.max_new_tokens} leaves no room for a prompt "
                         f"in a sequence of {seq_length} (set --seq-length)")
    room = seq_length - opts.max_new_tokens
    return seq_length, min(opts.max_prompt_length or room, room)


def log(message: str) -> None:
    """stderr, once per job (global rank 0; torchrun sets RANK before anything starts)."""
    if os.environ.get("RANK", "0") == "0":
        print(message, file=sys.stderr, flush=True)


def run_command(parse, run, argv=None) -> int:
    """``run(parse(argv))`` as a command: 0 done, 1 bad input (the message on stderr), 2 bad
    flags (argparse's usage)."""
    from megatron_patch.convert.io_utils import CheckpointError

    opts = parse(argv)
    compat.exit_unless_supported()
    try:
        run(opts)
    except (CheckpointError, FileNotFoundError, PermissionError, ValueError) as err:
        log(f"error: {err}")
        return 1
    return 0
