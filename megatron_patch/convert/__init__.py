"""Checkpoint conversion: HF <-> Megatron with tensor/pipeline resharding.

Entry points live in :mod:`megatron_patch.convert.engine`; the CLI is
``python -m megatron_patch.convert``."""
