"""Run megatron_patch.pretrain and SIGKILL this process at a chosen moment, as a crash would:
``--die-after-iteration K`` right after iteration K's step (before any save it triggers), or
``--die-in-save K`` halfway through writing checkpoint K (a partial rank file on disk)."""
import os
import signal
import sys


def main():
    argv = sys.argv[1:]
    mode, when = argv[0], int(argv[1])
    rest = argv[2:]
    from megatron_patch.convert import megatron_io
    from megatron_patch.training import loop

    if mode == "--die-after-iteration":
        step, calls = loop.train_step, []

        def train_step(*args, **kwargs):
            result = step(*args, **kwargs)
            calls.append(1)
            if len(calls) == when:
                os.kill(os.getpid(), signal.SIGKILL)
            return result
        loop.train_step = train_step
    elif mode == "--die-in-save":
        save = megatron_io.save_rank_file

        def save_rank_file(iter_dir, *args, **kwargs):
            if iter_dir.endswith(f"iter_{when:07d}.tmp"):
                os.makedirs(iter_dir, exist_ok=True)
                with open(os.path.join(iter_dir, "partial.pt"), "wb") as handle:
                    handle.write(b"half a checkpoint")
                os.kill(os.getpid(), signal.SIGKILL)
            return save(iter_dir, *args, **kwargs)
        megatron_io.save_rank_file = save_rank_file
    else:
        raise SystemExit(f"unknown mode {mode}")
    from megatron_patch.pretrain import main as pretrain_main

    sys.exit(pretrain_main(rest))


if __name__ == "__main__":
    main()
