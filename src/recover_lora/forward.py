"""Forward helpers every stage shares: the decoder of a (PEFT-wrapped) model, its final hidden
states, the head that turns them into logits exactly as the model's own forward does, and the
autocast / activation-checkpointing settings a forward runs under."""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import Callable

import torch
from peft import PeftModel
from transformers import PreTrainedModel

from .utils import log


def base_model_of(model: torch.nn.Module) -> PreTrainedModel:
    return model.get_base_model() if isinstance(model, PeftModel) else model


def decoder_of(model: torch.nn.Module) -> torch.nn.Module:
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    return base.get_decoder()


def hidden_states(model: torch.nn.Module, ids: torch.Tensor, all_layers: bool = False):
    """Final (normed) hidden states: the lm_head is applied chunk by chunk in the loss. With
    ``all_layers``, the tuple (embeddings, output of layer 0, ..., of layer L-2, final normed)."""
    out = decoder_of(model)(input_ids=ids, use_cache=False, output_hidden_states=all_layers)
    return tuple(out.hidden_states) if all_layers else out.last_hidden_state


def lm_head_of(model: PreTrainedModel) -> Callable[[torch.Tensor], torch.Tensor]:
    """hidden -> logits exactly as the model's forward does (incl. Gemma-2 style soft-capping)."""
    lm_head = model.get_output_embeddings()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        return lambda h: torch.tanh(lm_head(h) / cap) * cap
    return lm_head


def autocast_on(cfg, device: torch.device) -> bool:
    """``cfg.autocast``: "auto" is bf16 on a GPU and off on a CPU; "bf16"; "off"."""
    on = cfg.autocast == "bf16" or (cfg.autocast == "auto" and device.type == "cuda")
    if on and device.type == "cpu":
        warn_slow_cpu_bf16()
    return on


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX): otherwise bf16 is emulated, and
    slow (an AVX2 EPYC: 1.3 against 76 GFLOP/s in fp32 a thread, BENCHMARKS.md)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


@functools.cache
def warn_slow_cpu_bf16() -> None:
    """Say once that bf16 autocast was asked for on a CPU that emulates bf16 matmuls."""
    if not cpu_has_bf16():
        log.warning("bf16 autocast on a CPU without bf16 matmul instructions (AVX512-BF16 / AMX): ~50x slower "
                    "than fp32 here; set autocast to off")


def train_autocast(cfg, device: torch.device):
    # No weight-cast cache: each weight is cast once a forward anyway, and a CUDA graph capture
    # forbids the cache (it would replay casts of stale weights).
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast_on(cfg, device), cache_enabled=False)


def lora_casts_off(model: torch.nn.Module, active: bool):
    """Under autocast, stop peft from casting each LoRA input to fp32 (autocast casts it back to
    bf16 for the matmul anyway: two wasted passes over the activations per adapted module)."""
    if not active:
        return contextlib.nullcontext()
    try:
        from peft.helpers import disable_input_dtype_casting
    except ImportError:  # older peft
        return contextlib.nullcontext()
    return disable_input_dtype_casting(model)


def trainable_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def activation_checkpointing(model: torch.nn.Module, on: bool) -> None:
    """Turn transformers' per-layer activation checkpointing on or off (non-reentrant, no RNG
    stashing: no dropout here, and reading the CUDA RNG state is not allowed in a graph capture)."""
    base = base_model_of(model)
    kw = {"use_reentrant": False, "preserve_rng_state": False}
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.2x
        base.activation_checkpointing_enable(kw) if on else base.activation_checkpointing_disable()
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw) if on else \
            base.gradient_checkpointing_disable()
    if not on and hasattr(base, "disable_input_require_grads"):
        base.disable_input_require_grads()  # enable registered an embedding hook; drop it
