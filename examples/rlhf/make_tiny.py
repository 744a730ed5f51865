#!/usr/bin/env python3
"""The tiny RLHF example's inputs, made from nothing (no downloads), in OUT:

    tokenizer/      a byte-level BPE tokenizer (280 tokens) trained on the standard library's
                    docstrings
    sft/            a random llama (2 layers, hidden 64) with that tokenizer, converted to the
                    Megatron layout: the actor and the reference
    rm/             a random llama reward model (LlamaForSequenceClassification), converted
                    with its scalar head: the critic and the reward model
    prompts.jsonl   {"prompt": ...} lines

    python examples/rlhf/make_tiny.py OUT [--vocab-size 300] [--size tiny] [--dtype float32]

The models are random: the tiny run shows the machinery (the reward it optimises is what the
random reward model, or the rule of configs/tiny/grpo.yaml, prefers), not a useful model.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

QUESTIONS = ("What does the function return", "How is the file opened", "Why is the value "
             "None", "When is the error raised", "Which module defines the class", "Where is "
             "the result written", "What is the default", "How are the lines counted")


def random_llama(out: str, tokenizer_dir: str, vocab_size: int | None, seed: int, reward: bool,
                 size: str = "tiny", dtype: str = "float32") -> str:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers import AutoTokenizer

    from megatron_patch.registry import get_family

    family = get_family("llama")
    config = family.hf_config_from_args(family.args_for_size(
        size, reward_head=reward, **({"vocab_size": vocab_size} if vocab_size else {})))
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    auto = AutoModelForSequenceClassification if reward else AutoModelForCausalLM
    model = auto.from_config(AutoConfig.for_model(**config))
    if size == "tiny":  # (a larger random model is left as transformers draws it: sharper
        # attention there makes bf16 chaotic, an agreement of 2 instead of 1.02)
        with torch.no_grad():  # sharper attention than std-0.02 weights give
            for name, param in model.named_parameters():
                if "q_proj" in name or "k_proj" in name:
                    param.mul_(5.0)
            if reward:  # scores that spread about 1, as a trained reward model's do
                model.score.weight.mul_(25.0)
    model.to(getattr(torch, dtype)).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="directory to write (created)")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="the models' vocabulary (>= the tokenizer's 280 tokens; default 300 "
                             "for the tiny size, else the size's own)")
    parser.add_argument("--size", default="tiny", help="a row of the llama sizes table (the "
                        "benchmark uses 1B)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--prompts", type=int, default=64)
    args = parser.parse_args(argv)
    from megatron_patch.convert import engine
    from megatron_patch.data.corpus import iter_stdlib_docstrings
    from megatron_patch.tokenizers.train import train_bpe_tokenizer

    os.makedirs(args.out, exist_ok=True)
    texts = [text for _, text in zip(range(400), iter_stdlib_docstrings())]
    tokenizer = train_bpe_tokenizer(texts, 280, os.path.join(args.out, "tokenizer"))
    for name, reward, seed in (("sft", False, 0), ("rm", True, 1)):
        vocab = args.vocab_size or (300 if args.size == "tiny" else None)
        hf = random_llama(os.path.join(args.out, f"{name}_hf"), tokenizer, vocab, seed, reward,
                          args.size, args.dtype)
        target = os.path.join(args.out, name)
        shutil.rmtree(target, ignore_errors=True)
        engine.convert_hf_to_megatron(hf, target, progress=False)
        shutil.rmtree(hf)
    with open(os.path.join(args.out, "prompts.jsonl"), "w", encoding="utf-8") as handle:
        for index in range(args.prompts):
            question = QUESTIONS[index % len(QUESTIONS)]
            handle.write(json.dumps({"prompt": f"{question} ({index})?"}) + "\n")
    print(f"tiny RLHF inputs in {args.out}: tokenizer/, sft/ (actor, reference), rm/ (critic, "
          f"reward model), prompts.jsonl ({args.prompts} prompts)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
