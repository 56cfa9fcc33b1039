"""The methods ``recover`` can run, by name: recover-lora (the paper's), and the comparison points
full-kd (all weights, the paper's LLM-QAT*) and sft-lora (labeled train splits). Each is a module
with a :class:`~recover_lora.methods.base.Method`; a new one is a module and a line here."""

from __future__ import annotations

from ..utils import RecoverLoraError
from .base import Method
from .full_kd import METHOD as FULL_KD
from .recover_lora import METHOD as RECOVER_LORA
from .sft_lora import METHOD as SFT_LORA

METHODS: dict[str, Method] = {m.name: m for m in (RECOVER_LORA, FULL_KD, SFT_LORA)}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise RecoverLoraError(f"unknown method {name!r}; use one of {tuple(METHODS)}")
    return METHODS[name]
