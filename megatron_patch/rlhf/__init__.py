"""Alignment on megatron-core: reward models (``reward``), and the trainers built on them. Uses
``training`` and ``generation``; nothing below it imports it (DESIGN.md)."""
