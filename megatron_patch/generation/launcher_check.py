"""``python -m megatron_patch.generation.launcher_check FAMILY MODEL_SIZE TOKENIZER``: the
launcher's check of the names it cannot validate in bash. Prints the problem, naming the
positional argument, and exits 2; when all is well prints the tokenizer flag to pass and its
value on two lines, and exits 0."""
from __future__ import annotations

import os
import sys


def check(family_name: str, model_size: str, tokenizer: str) -> tuple[int, str]:
    """(exit code, message, or the flag and its value on two lines)."""
    from megatron_patch.registry import get_family
    from megatron_patch.tokenizers import canonical_tokenizer_type

    try:
        family = get_family(family_name)
    except ValueError as err:
        return 2, f"FAMILY: {err}"
    if model_size not in family.sizes:
        return 2, (f"MODEL_SIZE '{model_size}' is not a {family.name} size; choose one of: "
                   f"{', '.join(family.sizes)}")
    if os.path.exists(tokenizer):
        return 0, f"--tokenizer-path\n{tokenizer}"
    try:
        return 0, f"--tokenizer-type\n{canonical_tokenizer_type(tokenizer)}"
    except ValueError as err:
        return 2, f"TOKENIZER '{tokenizer}' is not a tokenizer directory, and {err}"


def main(argv=None) -> int:
    """Command line: exit code 0 (flag and value printed) or 2 (problem printed)."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 3:
        print("usage: python -m megatron_patch.generation.launcher_check FAMILY MODEL_SIZE "
              "TOKENIZER", file=sys.stderr)
        return 2
    code, message = check(*argv)
    print(message)
    return code


if __name__ == "__main__":
    sys.exit(main())
