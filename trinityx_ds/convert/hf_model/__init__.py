"""The TrinityX model for transformers; its two files are copied into every exported folder."""
from trinityx_ds.convert.hf_model.configuration_trinityx import TrinityXConfig
from trinityx_ds.convert.hf_model.modeling_trinityx import TrinityXForCausalLM, TrinityXMoCaE

__all__ = ["TrinityXConfig", "TrinityXForCausalLM", "TrinityXMoCaE"]
