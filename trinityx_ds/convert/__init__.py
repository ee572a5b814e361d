"""Checkpoint conversion room: HF <-> megatron state-dict adapters, import and export."""
