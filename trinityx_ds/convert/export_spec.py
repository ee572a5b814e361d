"""What `trinityx export-hf` offers, by name: the formats, the Auto classes an exported TrinityX
folder maps to its remote code, the refusal. Nothing heavy: the command's parser (convert/export.py),
which every `trinityx` invocation builds, `--help` included, reads them; convert/formats.py makes them."""
from __future__ import annotations

FORMATS = ("trinityx", "dense", "mixtral", "peft")
# the remote code an exported TrinityX folder ships (write.MODEL_FILES), for AutoConfig / AutoModel
AUTO_MAP = {"AutoConfig": "configuration_trinityx.TrinityXConfig",
            "AutoModelForCausalLM": "modeling_trinityx.TrinityXForCausalLM"}


class ExportRefused(ValueError):
    """The requested format cannot compute exactly what the model computes."""
