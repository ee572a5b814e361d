"""Process groups, launcher environment and megatron CPU compatibility."""
