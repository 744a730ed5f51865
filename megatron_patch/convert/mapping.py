"""Weight-mapping tables: one row per Megatron tensor, naming its HF sources, the reversible op
that joins them and how tensor parallelism splits the result. A family declares its table once;
:mod:`megatron_patch.convert.engine` runs it in both directions."""
from __future__ import annotations

from dataclasses import dataclass, field

from megatron_patch.convert.ops import Copy
from megatron_patch.convert.sharding import Split

LAYER = "{layer}"


@dataclass(frozen=True)
class Row:
    """``megatron`` <- op(``hf``...). Names holding ``{layer}`` repeat for every layer; other
    rows live on the first pipeline stage (``stage="first"``) or the last (``"last"``)."""

    megatron: str
    hf: tuple[str, ...]
    op: object = field(default_factory=Copy)
    tp: Split | None = None
    stage: str = "layer"

    def __post_init__(self):
        if isinstance(self.hf, str):
            object.__setattr__(self, "hf", (self.hf,))
        per_layer = LAYER in self.megatron
        if per_layer != (self.stage == "layer"):
            raise ValueError(f"row {self.megatron}: per-layer names need stage='layer' and "
                             f"others 'first' or 'last'")


@dataclass(frozen=True)
class Binding:
    """A row bound to one layer: concrete names on both sides."""

    row: Row
    megatron_local: str   # name inside the stage's state dict (local layer number)
    megatron_global: str  # name with the global layer number
    hf: tuple[str, ...]


def bind_stage(rows: list[Row], layers: range, first: bool, last: bool) -> list[Binding]:
    """Concrete names of every tensor on one pipeline stage holding global ``layers``."""
    bound = []
    for row in rows:
        if row.stage == "first" and first or row.stage == "last" and last:
            bound.append(Binding(row, row.megatron, row.megatron, row.hf))
        elif row.stage == "layer":
            for local, layer in enumerate(layers):
                bound.append(Binding(
                    row,
                    row.megatron.replace(LAYER, str(local)),
                    row.megatron.replace(LAYER, str(layer)),
                    tuple(name.replace(LAYER, str(layer)) for name in row.hf),
                ))
    return bound
