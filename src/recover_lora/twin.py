"""An exact multi-head-attention (MHA) twin of a GQA / MQA model.

In grouped-query attention, query head ``h`` reads key/value head ``h // n_rep``
(transformers' ``repeat_kv`` expands each KV head ``n_rep`` times, consecutively). Repeating the
rows of ``k_proj`` / ``v_proj`` (and their biases, Qwen2) the same way gives a model with
``num_key_value_heads == num_attention_heads`` that computes the same function with MHA shapes:
damage to it is then per-head, which a GQA model cannot represent.

    twin = mha_twin(model)                          # a new model; ``model`` is untouched
    twin = load_model("mha:smollm2", LoadConfig())   # load specs with an ``mha:`` prefix
"""

from __future__ import annotations

import copy

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from .utils import strip_gguf_quant_config
from .utils import RecoverLoraError

def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _repeat_rows(t: torch.Tensor, n_kv: int, n_rep: int) -> torch.Tensor:
    """[n_kv * d, ...] -> [n_kv * n_rep * d, ...]: each head's block of rows n_rep times in a row."""
    heads = t.reshape(n_kv, -1, *t.shape[1:])
    return heads.repeat_interleave(n_rep, dim=0).reshape(-1, *t.shape[1:])


@torch.no_grad()
def mha_twin(model: PreTrainedModel) -> PreTrainedModel:
    """A new model equal in function to ``model`` whose attention has one KV head per query head."""
    cfg = copy.deepcopy(model.config)
    text = _text_config(cfg)
    n_q, n_kv = text.num_attention_heads, getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    if n_q % n_kv:
        raise RecoverLoraError(f"num_attention_heads {n_q} is not a multiple of num_key_value_heads {n_kv}")
    n_rep = n_q // n_kv
    text.num_key_value_heads = n_q
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    state = {}
    for name, t in model.state_dict().items():
        if n_rep > 1 and name.endswith(("k_proj.weight", "v_proj.weight", "k_proj.bias", "v_proj.bias")):
            t = _repeat_rows(t, n_kv, n_rep)
        state[name] = t
    dtype = next(model.parameters()).dtype
    twin = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    strip_gguf_quant_config(twin)
    missing, unexpected = twin.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(cfg, "tie_word_embeddings", False) else set()
    if [k for k in missing if k not in tied] or unexpected:
        raise RecoverLoraError(f"MHA twin: state dict mismatch (missing {missing[:3]}, unexpected {unexpected[:3]})")
    if tied:
        twin.tie_weights()
    twin.to(next(model.parameters()).device)
    twin.eval()
    twin.requires_grad_(False)
    return twin
