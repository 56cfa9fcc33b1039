"""recover-lora: repair damaged LLM weights by distilling the reference into LoRA adapters.

Stages, one module each: ``load`` -> ``degrade`` -> ``synth`` -> ``distill`` -> ``evaluate`` ->
``report`` -> ``export``; ``recover.recover`` runs the whole job. Each stage has one typed config
(all in ``config``). Names below are imported on first use, so that ``import recover_lora.config``
(and the CLI's ``--help``) costs no torch import. (The functions ``degrade.degrade`` and
``recover.recover`` are not re-exported here: their names are taken by their modules.)
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"
_HOMES = {
    "LoadConfig": "config", "SynthConfig": "config", "AdapterConfig": "config", "DistillConfig": "config",
    "RecoverConfig": "config", "DegradeConfig": "degrade", "RecoverLoraError": "errors",
    "load_model": "load", "load_tokenizer": "load", "load_pair": "load", "check_compatible": "load",
    "synthesize": "synth", "load_synthetic": "synth", "attach_adapters": "distill", "train": "distill",
    "measure": "kl",
}
__all__ = list(_HOMES)


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
