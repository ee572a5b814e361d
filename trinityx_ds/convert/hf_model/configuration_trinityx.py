"""TrinityX config for transformers: a Llama-family decoder config plus the MoCaE settings.

Standalone (torch and transformers only): exported folders carry this file, so
`trust_remote_code=True` works where trinityx_ds is not installed.
"""
from transformers import PretrainedConfig

BASE_MODEL_TYPES = ("llama", "mistral", "qwen2", "gemma", "qwen3")
MOCAE_DEFAULTS = {
    "expert_names": ["help", "harm", "honest"],
    "kind": "lora",  # lora: low-rank deltas of the base FFN; full: whole FFNs
    "layers": "all",  # or a list of layer indices
    "lora_rank": 8,
    "lora_alpha": 16.0,
    "lora_targets": ["gate_proj", "up_proj", "down_proj"],
    "temperature": 0.7,  # informational: each router's log_temperature buffer is what runs
    "importance": None,  # gamma per expert (None: all 1); likewise stored per layer
    "top_k": 1,
    "renormalize": True,
    "normalize_output": False,  # post-mix RMSNorm
}


class TrinityXConfig(PretrainedConfig):
    """The backbone's own HF fields (Llama, Mistral, Qwen2, Qwen3 or Gemma, named by `base_model_type`) and
    `mocae`. `force_expert` (index or name, None: routed) sends every token to one expert."""

    model_type = "trinityx"

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    rope_parameters: dict | None = None
    attention_bias: bool = False
    attention_dropout: float | int = 0.0
    mlp_bias: bool = False
    sliding_window: int | None = None
    use_sliding_window: bool = False
    max_window_layers: int = 28
    layer_types: list[str] | None = None
    use_bidirectional_attention: bool | None = None  # Gemma's field (refused when set: causal only)
    base_model_type: str = "llama"
    mocae: dict | None = None
    force_expert: int | str | None = None

    def __post_init__(self, **kwargs):
        if self.base_model_type not in BASE_MODEL_TYPES:
            raise ValueError(f"base_model_type: {self.base_model_type!r} — one of {', '.join(BASE_MODEL_TYPES)}")
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.mocae = {**MOCAE_DEFAULTS, **(self.mocae or {})}
        if self.mocae["top_k"] == "all":
            self.mocae["top_k"] = len(self.mocae["expert_names"])
        if self.base_model_type in ("qwen2", "qwen3"):  # Qwen2Model / Qwen3Model read per-layer attention types
            self.sliding_window = self.sliding_window if self.use_sliding_window else None
            if self.layer_types is None:
                windowed = self.sliding_window is not None
                self.layer_types = ["sliding_attention" if windowed and i >= self.max_window_layers
                                    else "full_attention"
                                    for i in range(self.num_hidden_layers)]
        super().__post_init__(**kwargs)

    def mocae_layers(self) -> list[int]:
        layers = self.mocae["layers"]
        return list(range(self.num_hidden_layers)) if layers == "all" else sorted(layers)

    def forced_index(self) -> int | None:
        f, names = self.force_expert, self.mocae["expert_names"]
        if f is None:
            return None
        index = names.index(f) if f in names else f
        if not isinstance(index, int) or not 0 <= index < len(names):
            raise ValueError(f"force_expert: {f!r} — an expert index 0..{len(names) - 1} or one of {names}")
        return index
