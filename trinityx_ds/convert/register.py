"""TrinityX in transformers' Auto classes: once registered, `AutoModelForCausalLM.from_pretrained`
loads exported TrinityX folders without `trust_remote_code`.

`install()` (what `import trinityx_ds` calls) imports nothing: importing transformers' Auto
classes costs seconds, which every `trinityx` command would pay. It registers when transformers'
`modeling_auto` module has finished loading (at once if it already has), so only processes that
use the Auto classes import the model code.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import warnings

_AUTO = "transformers.models.auto.modeling_auto"
# what the model code imports at its top; it must not be half-initialised when we register
_NEEDS = ("transformers.configuration_utils", "transformers.modeling_utils", "transformers.generation.utils")


def register() -> None:
    """Registers the config and the model (idempotent)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from trinityx_ds.convert.hf_model import TrinityXConfig, TrinityXForCausalLM

    AutoConfig.register(TrinityXConfig.model_type, TrinityXConfig, exist_ok=True)
    AutoModelForCausalLM.register(TrinityXConfig, TrinityXForCausalLM, exist_ok=True)


def _initialising(name: str) -> bool:
    spec = getattr(sys.modules.get(name), "__spec__", None)
    return bool(getattr(spec, "_initializing", False))


def _register_after_auto() -> None:
    busy = [n for n in _NEEDS if _initialising(n)]
    if busy:  # an unusual import order; registering now would break the import in progress
        warnings.warn(f"trinityx_ds: not registered with transformers' Auto classes ({busy[0]} was still loading); "
                      "call trinityx_ds.convert.register.register()", stacklevel=2)
        return
    register()


class _AfterAutoImport(importlib.abc.MetaPathFinder):
    """Finds `modeling_auto` through the other finders and runs registration after its body."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != _AUTO:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        body = spec.loader.exec_module

        def exec_module(module):
            body(module)
            _register_after_auto()

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    """Registers now if transformers' Auto classes are loaded, else right after they load."""
    if _AUTO in sys.modules:
        _register_after_auto()
    elif not any(isinstance(f, _AfterAutoImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterAutoImport())
