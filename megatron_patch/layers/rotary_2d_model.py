"""GPTModel with ChatGLM-6B's 2-D rotary positions (layers/glm_positions.py explains them)."""
from __future__ import annotations

from megatron.core.models.gpt import GPTModel

from megatron_patch.layers.glm_positions import rotary_2d


class Rotary2DGPTModel(GPTModel):
    """GPTModel whose rotary angles come from 2-D position ids [b, 2, s] (glm_positions.rotary_2d),
    on every pipeline stage (built with ``position_embedding_type="none"``, so megatron-core
    makes no table of its own)."""

    two_d_positions = True  # what generation checks (glm_positions.uses_rotary_2d)

    def _preprocess(self, input_ids, position_ids, *args, **kwargs):
        if position_ids is None or position_ids.dim() != 3 or position_ids.size(1) != 2:
            raise ValueError("a 2-D rotary (ChatGLM-6B) model takes position ids [batch, 2, "
                             "seq] (layers/glm_positions.prefix_lm_inputs)")
        output = list(super()._preprocess(input_ids, position_ids, *args, **kwargs))
        output[1] = rotary_2d(position_ids, self.config.kv_channels)
        return tuple(output)
