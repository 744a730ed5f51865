"""A reward model's scalar head in place of GPTModel's output layer.

HF's ``*ForSequenceClassification`` with one label puts ``score`` ([1, hidden], no bias) over the
final norm's output; here the same weight (``output_layer.weight``, whole on every tensor-
parallel rank) turns each position's hidden state into one score, so the model returns
``[batch, seq, 1]`` scores where a language model returns logits. Which position's score counts
(the last token of each sequence) is the caller's explicit index (``rlhf/reward.py``).

Every tensor-parallel rank computes the same scores from the same (full) hidden states, so the
weight's gradient is the same on each and needs no reduction; under sequence parallelism the
hidden states are gathered first, and their gradient is split back without a sum
(``tensor_parallel_output_grad=False``: each rank holds the whole gradient, not a part of it).
"""
from __future__ import annotations

import torch


class ScalarHead(torch.nn.Module):
    """``hidden [s, b, h] -> (scores [s, b, 1], None)``, ColumnParallelLinear's call shape."""

    def __init__(self, config):
        super().__init__()
        device = torch.device("cpu") if config.use_cpu_initialization or \
            not torch.cuda.is_available() else torch.device("cuda", torch.cuda.current_device())
        self.weight = torch.nn.Parameter(torch.empty(1, config.hidden_size, device=device,
                                                     dtype=config.params_dtype))
        config.init_method(self.weight)
        self.sequence_parallel = config.sequence_parallel

    def forward(self, hidden, weight=None, runtime_gather_output=None):
        """``weight``: a tied output weight GPTModel passes; a reward model never ties it."""
        if self.sequence_parallel:
            from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

            hidden = gather_from_sequence_parallel_region(hidden,
                                                          tensor_parallel_output_grad=False)
        return torch.matmul(hidden, self.weight.t()), None


def install(model, config) -> None:
    """Replace the last stage's output layer of ``model`` by a :class:`ScalarHead`."""
    model.output_layer = ScalarHead(config)
