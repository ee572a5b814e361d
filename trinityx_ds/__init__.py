"""TrinityX-DS: HHH experts fused by a calibrated router (MoCaE), trained with DeepSpeed and megatron-core.

Importing the package registers TrinityXForCausalLM with transformers' Auto classes (lazily:
only once transformers' auto-modeling module loads), so exported folders load without
trust_remote_code.
"""
import warnings as _warnings

from trinityx_ds.convert.register import install as _install

_install()

# Known, harmless notices of the pinned stack, printed by every rank at every step or import
# (hundreds of lines per run, burying the progress bar): DeepSpeed's ZeRO calls torch's
# deprecated collective names, and megatron-core announces each fallback for an absent Apex or
# Transformer Engine. Only these exact messages are silenced.
for _message, _category in (
    (r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated", FutureWarning),
    (r"(Apex|Transformer Engine and Apex) (is|are) not installed", UserWarning),
    (r"full scope is deprecated", UserWarning),
):
    _warnings.filterwarnings("ignore", message=_message, category=_category)
