"""``python -m megatron_patch.rlhf.prepare SOURCE_RM_PATH SOURCE_SFT_PATH TARGET_RM_PATH
TARGET_SFT_PATH`` (``toolkits/rlhf/sft_rm_model_prepare.sh``): the model directories PPO loads,
in the seed's layout:

    TARGET_RM_PATH/rw_pred    TARGET_RM_PATH/rw_train     (the reward model: scoring, training)
    TARGET_SFT_PATH/sft_pred  TARGET_SFT_PATH/sft_train   (the SFT model: generation, training)

Each is a Megatron checkpoint with its tokenizer. A source is an HF directory (converted: the
reward model from ``*ForSequenceClassification``) or a Megatron checkpoint (resharded). The
``*_train`` copies get TP x PP (environment ``TP``, ``PP``, default 1), the ``*_pred`` copies TP
and PP 1 (generation and scoring run without pipeline stages). The reward source must be a
reward model and the SFT source a language model; a target that exists and is not empty is
refused (``OVERWRITE=1`` replaces it).
"""
from __future__ import annotations

import json
import os
import sys

USAGE = """usage: sft_rm_model_prepare.sh SOURCE_RM_PATH SOURCE_SFT_PATH TARGET_RM_PATH TARGET_SFT_PATH
  SOURCE_RM_PATH    reward model: HF *ForSequenceClassification (one label) or Megatron checkpoint
  SOURCE_SFT_PATH   SFT model: HF *ForCausalLM or Megatron checkpoint
  TARGET_RM_PATH    gets rw_pred/ and rw_train/
  TARGET_SFT_PATH   gets sft_pred/ and sft_train/
  environment: TP, PP (default 1): the layout of the *_train copies (the *_pred ones: TP, PP 1);
               OVERWRITE=1 replaces non-empty targets"""


def _is_reward(path: str) -> bool:
    from megatron_patch.convert import megatron_io as mio
    from megatron_patch.families.base import is_reward_config

    config = os.path.join(path, "config.json")
    if os.path.isfile(config):
        with open(config) as handle:
            return is_reward_config(json.load(handle), config)
    meta = mio.read_metadata(mio.resolve_checkpoint(path)[0]) or {}
    return bool(meta.get("model_args", {}).get("reward_head"))


def prepare(rm: str, sft: str, target_rm: str, target_sft: str, tp: int = 1, pp: int = 1,
            overwrite: bool = False) -> list[str]:
    """Write the four role directories; returns their paths."""
    from megatron_patch.convert import engine

    for path, name, reward in ((rm, "SOURCE_RM_PATH", True), (sft, "SOURCE_SFT_PATH", False)):
        if not os.path.exists(path):
            raise ValueError(f"{name} '{path}' does not exist")
        if _is_reward(path) != reward:
            raise ValueError(f"{name} '{path}' holds "
                             f"{'a reward model' if not reward else 'a language model'}; "
                             f"it must hold {'a reward' if reward else 'a language (SFT)'} model")
    written = []
    for source, base, role in ((rm, target_rm, "rw"), (sft, target_sft, "sft")):
        for kind, layout in (("pred", engine.Target(tp, 1)), ("train", engine.Target(tp, pp))):
            out = os.path.join(base, f"{role}_{kind}")
            if os.path.isfile(os.path.join(source, "config.json")):
                engine.convert_hf_to_megatron(source, out, target=layout, overwrite=overwrite,
                                              progress=False)
            else:
                engine.reshard_megatron(source, out, layout, overwrite=overwrite,
                                        progress=False)
            print(f"[prepare] {out}: {role} model from {source} at TP {tp} PP {layout.pipeline_parallel}",
                  flush=True)
            written.append(out)
    return written


def main(argv=None) -> int:
    from megatron_patch.convert.io_utils import CheckpointError

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 4 or any(a in ("-h", "--help") for a in argv):
        print(USAGE, file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    try:
        tp, pp = (int(os.environ.get(name, "1")) for name in ("TP", "PP"))
        if tp < 1 or pp < 1:
            raise ValueError
    except ValueError:
        print(f"error: TP and PP must be positive integers, got TP={os.environ.get('TP')!r} "
              f"PP={os.environ.get('PP')!r}\n{USAGE}", file=sys.stderr)
        return 2
    try:
        prepare(*argv, tp=tp, pp=pp, overwrite=os.environ.get("OVERWRITE") == "1")
    except (CheckpointError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
