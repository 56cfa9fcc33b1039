"""Forward helpers every stage shares: the decoder of a (PEFT-wrapped) model, its final hidden
states, and the head that turns them into logits exactly as the model's own forward does."""

from __future__ import annotations

from typing import Callable

import torch
from peft import PeftModel
from transformers import PreTrainedModel


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
