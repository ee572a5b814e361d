"""Storage room: where a run keeps its files (layout), atomic writes, safetensors shards, and the
HF-named tensor sources every stage reads from. No model, no process group: every other room may
use it, and it uses none of them."""
