"""The one KL meter: KL(reference || model) per token and top-1 agreement on fixed held-out ids, at
temperature 1. ``recover`` measures its student with it before, during and after training;
``diagnose`` measures the degraded model with one layer restored at a time.

The reference's final hidden states are computed once. With ``cache`` its probabilities are kept
too when they fit (a pass then costs the model's head alone), and ``keep_inputs()`` records the
model's input to every decoder layer, so that a later pass after changing only layers >= i starts
at layer i (on average half the layers)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .config import DistillConfig
from .forward import autocast_on, base_model_of, decoder_of, hidden_states, lm_head_of, lora_casts_off, train_autocast
from .training.losses import chunked_loss_backward

CACHE_BYTES = 1.5e9  # the reference's probabilities kept in memory up to this size (SmolLM2, 2048 tokens: 0.4 GB)


def _kl_from_cache(hs: torch.Tensor, s_head, pt: torch.Tensor, neg_ent: torch.Tensor, mass: torch.Tensor,
                   t_arg: torch.Tensor, chunk: int = 512) -> tuple[float, float]:
    """Mean KL(reference || model) and top-1 agreement per token from the reference's cached
    probabilities p, its per-row sum p log p and sum p: KL = sum p log p - (sum p s' - lse(s') sum p)
    with s' the student's logits less their row maximum (small where p is large, so the fp32 row
    sums stay exact to ~1e-5; rows are totalled in fp64). No log-softmax of the student is written."""
    h = hs.reshape(-1, hs.shape[-1])
    kl, agree = 0.0, 0
    for i in range(0, h.shape[0], chunk):
        s = s_head(h[i:i + chunk]).float()
        top, arg = s.max(dim=-1, keepdim=True)
        s = s.sub_(top)
        cross = (pt[i:i + chunk] * s).sum(-1) - torch.logsumexp(s, dim=-1) * mass[i:i + chunk]
        kl += float((neg_ent[i:i + chunk].double() - cross.double()).sum())
        agree += int((arg.squeeze(-1) == t_arg[i:i + chunk]).sum())
    n = h.shape[0]
    return kl / n, agree / n


def suffix_hidden(model: nn.Module, h_in: torch.Tensor, start: int) -> torch.Tensor:
    """Final (normed) hidden states computed from ``h_in``, the input of decoder layer ``start``,
    through layers ``start``.. only: what the full forward gives when layers before ``start`` are
    unchanged. (The decoder runs with its layer list, and the per-layer attention types Gemma and
    Qwen index by position, cut to the suffix; ``inputs_embeds`` stands in for the prefix's output.)"""
    dec = decoder_of(model)
    layers, types = dec.layers, getattr(dec.config, "layer_types", None)
    try:
        dec.layers = nn.ModuleList(list(layers)[start:])
        if types is not None:
            dec.config.layer_types = list(types)[start:]
        return dec(inputs_embeds=h_in, use_cache=False).last_hidden_state
    finally:
        dec.layers = layers
        if types is not None:
            dec.config.layer_types = types


class KLMeter:
    """``KLMeter(reference, ids)(model)`` -> {"kl", "top1"}; ``cfg`` gives autocast and chunk_tokens."""

    def __init__(self, reference: nn.Module, ids: torch.Tensor, batch_size: int = 32, cfg=None, cache: bool = False):
        self.cfg = cfg or DistillConfig()
        self.device = next(reference.parameters()).device
        self.batches = [ids[i:i + batch_size].to(self.device) for i in range(0, len(ids), batch_size)]
        self.t_head = lm_head_of(reference)
        with torch.no_grad(), train_autocast(self.cfg, self.device):
            self.t_hidden = [hidden_states(reference, x) for x in self.batches]
        self.calls = 0
        vocab = reference.get_output_embeddings().weight.shape[0]
        self.t_cache = None
        if cache and ids.numel() * vocab * 4 <= CACHE_BYTES:
            self.t_cache = []
            with torch.no_grad():
                for ht in self.t_hidden:
                    lt = torch.log_softmax(self.t_head(ht.reshape(-1, ht.shape[-1])).float(), dim=-1)
                    pt = lt.exp()
                    self.t_cache.append((pt, (pt * lt).sum(-1), pt.sum(-1), lt.argmax(-1)))
                    del lt
        self.layer_inputs: list[tuple[torch.Tensor, ...]] | None = None
        self._keep = False

    def keep_inputs(self) -> None:
        """Record the model's input to every decoder layer on the next call."""
        self._keep = True

    def _hidden(self, model: nn.Module, b: int, x: torch.Tensor, keep: bool, start: int | None) -> torch.Tensor:
        if keep:
            hs_all = hidden_states(model, x, all_layers=True)
            self.layer_inputs.append(hs_all[:-1])  # embeddings, outputs of layers 0 .. L-2
            return hs_all[-1]
        if start is not None and self.layer_inputs is not None:
            return suffix_hidden(model, self.layer_inputs[b][start], start)
        return hidden_states(model, x)

    @torch.no_grad()
    def __call__(self, model: nn.Module, start: int | None = None) -> dict[str, Any]:
        """Mean over the tokens; ``start``: only layers >= start changed since ``keep_inputs``'s pass."""
        self.calls += 1
        was_training = model.training
        model.eval()
        s_head = lm_head_of(base_model_of(model))
        keep, self._keep = self._keep, False
        if keep:
            self.layer_inputs = []
        kl_sum, agree_sum, n = 0.0, 0.0, 0
        casts_off = autocast_on(self.cfg, self.device)
        for b, (x, ht) in enumerate(zip(self.batches, self.t_hidden)):
            with train_autocast(self.cfg, self.device), lora_casts_off(model, casts_off):
                hs = self._hidden(model, b, x, keep, start)
                if self.t_cache is None:
                    kl, agree = chunked_loss_backward(hs, ht, s_head, self.t_head, "kl", 1.0, self.cfg.chunk_tokens,
                                                      backward=False)
            if self.t_cache is not None:  # the head in the hidden states' own dtype, as it was cached
                kl, agree = _kl_from_cache(hs, s_head, *self.t_cache[b])
            kl_sum += kl * x.numel()
            agree_sum += agree * x.numel()
            n += x.numel()
        model.train(was_training)
        return {"kl": kl_sum / n, "top1": agree_sum / n}


def measure(student: nn.Module, teacher: nn.Module, ids: torch.Tensor, batch_size: int = 32, cfg=None) -> dict[str, float]:
    """Held-out KL(teacher || student) per token and top-1 agreement, at temperature 1 (one pass)."""
    return KLMeter(teacher, ids, batch_size, cfg)(student)
