"""Model room: architecture numbers, the megatron-core backbone and the MoCaE block."""
