"""TrinityX-DS: HHH experts fused by a calibrated router (MoCaE), trained with DeepSpeed and megatron-core.

Importing the package registers TrinityXForCausalLM with transformers' Auto classes (lazily:
only once transformers' auto-modeling module loads), so exported folders load without
trust_remote_code.
"""
from trinityx_ds.convert.register import install as _install

_install()
