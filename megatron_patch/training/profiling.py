"""Megatron-LM's --profile: iterations [--profile-step-start, --profile-step-end) are profiled
on the ranks of --profile-ranks.

* ``--profile`` alone brackets those iterations with cudaProfilerStart/Stop, for
  ``nsys profile --capture-range=cudaProfilerApi``, as Megatron-LM does;
* with ``--use-pytorch-profiler`` torch.profiler records them (CPU and CUDA activity, shapes)
  and writes a trace TensorBoard's profiler plugin and Perfetto open (to --tensorboard-dir, or
  --save, or the working directory), and prints a table of the kernels that took the most
  device time, so a user sees where a step goes without another tool.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from megatron_patch import compat


def add_arguments(group) -> None:
    group.add_argument("--profile", action="store_true",
                       help="profile iterations [--profile-step-start, --profile-step-end): "
                            "cudaProfilerStart/Stop around them (for nsys "
                            "--capture-range=cudaProfilerApi), or torch.profiler with "
                            "--use-pytorch-profiler")
    group.add_argument("--use-pytorch-profiler", action="store_true",
                       help="with --profile: torch.profiler, a trace file and a table of the "
                            "costliest kernels")
    group.add_argument("--profile-step-start", type=int, default=10,
                       help="first profiled iteration (1 is the first of the run)")
    group.add_argument("--profile-step-end", type=int, default=12,
                       help="the iteration after the last profiled one")
    group.add_argument("--profile-ranks", type=int, nargs="+", default=[0],
                       help="global ranks that profile")


def check_arguments(args) -> None:
    if args.use_pytorch_profiler and not args.profile:
        raise ValueError("--use-pytorch-profiler needs --profile")
    if args.profile and not 1 <= args.profile_step_start < args.profile_step_end:
        raise ValueError(f"--profile-step-start {args.profile_step_start} must be at least 1 and "
                         f"below --profile-step-end {args.profile_step_end}")


class StepProfiler:
    """``before(iteration)`` / ``after(iteration)`` around each training iteration (numbered
    from 1); does nothing unless --profile names this rank."""

    def __init__(self, args):
        rank = dist.get_rank() if dist.is_initialized() else 0
        self.active = bool(getattr(args, "profile", False)) and rank in args.profile_ranks
        self.args, self.rank, self.torch_profiler = args, rank, None

    def before(self, iteration: int) -> None:
        if not self.active or iteration != self.args.profile_step_start:
            return
        if self.args.use_pytorch_profiler:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if compat.on_gpu():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.torch_profiler = torch.profiler.profile(activities=activities,
                                                         record_shapes=True)
            self.torch_profiler.__enter__()
        elif compat.on_gpu():
            torch.cuda.cudart().cudaProfilerStart()
        else:
            print(f"[megatron_patch] --profile: cudaProfilerStart/Stop need a GPU; iterations "
                  f"{self.args.profile_step_start}-{self.args.profile_step_end - 1} are not "
                  f"profiled on the CPU (add --use-pytorch-profiler)", flush=True)

    def after(self, iteration: int) -> None:
        if not self.active or iteration != self.args.profile_step_end - 1:
            return
        if self.torch_profiler is None:
            if compat.on_gpu():
                torch.cuda.cudart().cudaProfilerStop()
            return
        profiler, self.torch_profiler = self.torch_profiler, None
        profiler.__exit__(None, None, None)
        self._report(profiler)

    def close(self) -> None:
        """The run ended inside the profiled range: stop and report what was recorded."""
        if self.torch_profiler is not None:
            self.after(self.args.profile_step_end - 1)

    def _report(self, profiler) -> None:
        folder = self.args.tensorboard_dir or self.args.save or "."
        os.makedirs(folder, exist_ok=True)
        steps = f"{self.args.profile_step_start}-{self.args.profile_step_end - 1}"
        path = os.path.join(folder, f"profile_rank{self.rank}_iters{steps}.pt.trace.json")
        profiler.export_chrome_trace(path)
        key = "self_cuda_time_total" if compat.on_gpu() else "self_cpu_time_total"
        table = profiler.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=60)
        print(f"profile of iterations {steps} on rank {self.rank} (trace: {path}):\n{table}",
              flush=True)
