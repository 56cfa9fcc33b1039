"""Distillation losses over the full vocabulary, and a chunked form that never materialises the
whole batch's logits.

All losses are per-token means. ``kl`` is KL(teacher || student) (forward KL, the paper's),
``reverse_kl`` is KL(student || teacher), ``jsd`` the Jensen-Shannon divergence. With a
temperature T both distributions are softened and the loss is scaled by T^2 (Hinton et al.), so
gradient magnitudes stay comparable across temperatures.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ..config import LOSSES  # noqa: E402,F401 - its home is the config


def divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str = "kl",
               temperature: float = 1.0) -> torch.Tensor:
    """Sum over tokens of the per-token divergence; logits [N, V] in any float dtype."""
    if kind not in LOSSES:
        raise ValueError(f"unknown loss {kind!r}; use one of {LOSSES}")
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if kind == "kl":
        per = (t.exp() * (t - s)).sum(-1)
    elif kind == "reverse_kl":
        per = (s.exp() * (s - t)).sum(-1)
    else:
        # log m = log((p + q) / 2), computed stably.
        # (a Python constant, not a new device tensor: no host-to-device copy inside CUDA graphs)
        m = torch.logsumexp(torch.stack([s, t]), dim=0) - math.log(2.0)
        per = 0.5 * (t.exp() * (t - m)).sum(-1) + 0.5 * (s.exp() * (s - m)).sum(-1)
    return per.sum() * temperature ** 2


def naive_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str = "kl",
               temperature: float = 1.0) -> torch.Tensor:
    """Reference implementation: full [B, L, V] logits of both models, mean over tokens."""
    V = student_logits.shape[-1]
    return divergence(student_logits.reshape(-1, V), teacher_logits.reshape(-1, V), kind,
                      temperature) / student_logits[..., 0].numel()


# Elements of one fp32 [chunk, V] logits tensor in the automatic chunk size: 64M (256 MB), so the
# few fp32 temporaries of one chunk stay around a gigabyte even for a 262k vocabulary.
AUTO_CHUNK_ELEMENTS = 64 * 1024 * 1024


def auto_chunk_tokens(vocab: int, n_tokens: int | None = None) -> int:
    """Tokens per loss chunk so that one fp32 [chunk, vocab] tensor holds ~``AUTO_CHUNK_ELEMENTS``."""
    c = max(64, AUTO_CHUNK_ELEMENTS // max(1, vocab))
    c = 1 << (c.bit_length() - 1)  # a power of two: friendlier matmul shapes
    return min(c, n_tokens) if n_tokens else c


def _log_softmax32(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    if temperature == 1.0:
        return torch.log_softmax(logits, dim=-1, dtype=torch.float32)  # no separate fp32 copy
    return torch.log_softmax(logits.to(torch.float32, copy=True).div_(temperature), dim=-1)


def _topk_kl_value_and_grad(s_logits: torch.Tensor, t_logits: torch.Tensor, k: int, temperature: float,
                            grad_scale: float | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Forward KL seen through the teacher's top-k: what a cache of each position's k largest
    teacher log-probabilities can give. The distributions are compared over k + 1 outcomes, the
    top-k tokens and "any other token" (teacher mass p_rest = 1 - sum p_k, student mass q_rest):

        sum_k p_k (log p_k - log q_k) + p_rest (log p_rest - log q_rest)

    Gradient w.r.t. the student's logits: T (q_j - p_j) on the top-k, T q_j (1 - p_rest / q_rest)
    elsewhere. (Renormalising the top-k and ignoring the rest, the obvious alternative, leaves the
    student's tail free: on SmolLM2 it recovered far less, see BENCHMARKS.md.)
    """
    T = temperature
    vals, idx = t_logits.topk(k, dim=-1)
    lse = torch.logsumexp(t_logits.float() / T, dim=-1, keepdim=True)
    lp = vals.float() / T - lse  # teacher log-probabilities of its top-k (normalised over the vocabulary)
    p = lp.exp()
    p_rest = (1.0 - p.sum(-1)).clamp_min(0.0)
    ls = _log_softmax32(s_logits, T)
    rest = ls.scatter(-1, idx, float("-inf"))  # student log-probs outside the teacher's top-k
    lq_rest = torch.logsumexp(rest, dim=-1)
    per = torch.linalg.vecdot(p, lp - ls.gather(-1, idx)) + torch.xlogy(p_rest, p_rest) - p_rest * lq_rest
    grad = None
    if grad_scale is not None:
        grad = ls.exp_().scatter_add_(-1, idx, -p)
        grad.sub_(rest.sub_(lq_rest.unsqueeze(-1)).exp_().mul_(p_rest.unsqueeze(-1))).mul_(T * grad_scale)
    return per.sum() * T ** 2, grad


def _kl_value_and_grad(s_logits: torch.Tensor, t_logits: torch.Tensor, kind: str, temperature: float,
                       grad_scale: float | None, teacher_topk: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sum over rows of KL (forward or reverse) and its gradient w.r.t. ``s_logits``, by hand.

    Autograd through ``divergence`` keeps five or six fp32 [rows, V] tensors alive; the closed
    forms below need three, updated in place. ``grad_scale`` multiplies the gradient (None: no
    gradient). Forward KL: d/ds = T (q - p); reverse KL: d/ds = T q (log q - log p - KL_row).
    """
    if teacher_topk and teacher_topk < t_logits.shape[-1]:
        return _topk_kl_value_and_grad(s_logits, t_logits, teacher_topk, temperature, grad_scale)
    T = temperature
    ls = _log_softmax32(s_logits, T)
    lt = _log_softmax32(t_logits, T)
    if kind == "kl":
        p = lt.exp()
        lt.sub_(ls)  # lt := log p - log q
        per = torch.linalg.vecdot(p, lt)
        del lt
        grad = None
        if grad_scale is not None:
            grad = ls.exp_().sub_(p).mul_(T * grad_scale)
        return per.sum() * T ** 2, grad
    # reverse KL(q || p)
    q = ls.exp()
    ls.sub_(lt)  # ls := log q - log p
    del lt
    per = torch.linalg.vecdot(q, ls)
    grad = None
    if grad_scale is not None:
        grad = ls.sub_(per.unsqueeze(-1)).mul_(q).mul_(T * grad_scale)
    return per.sum() * T ** 2, grad


def _vocab_of(head: Callable[[torch.Tensor], torch.Tensor], probe: torch.Tensor) -> int:
    weight = getattr(head, "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight.shape[0]
    with torch.no_grad():
        return head(probe.detach()).shape[-1]


def chunked_loss_backward(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor,
                          student_head: Callable[[torch.Tensor], torch.Tensor],
                          teacher_head: Callable[[torch.Tensor], torch.Tensor],
                          kind: str = "kl", temperature: float = 1.0, chunk_tokens: int = 2048,
                          scale: float = 1.0, backward: bool = True,
                          as_tensors: bool = False, teacher_topk: int = 0,
                          extra_loss: torch.Tensor | None = None) -> tuple[float, float] | tuple[torch.Tensor, torch.Tensor]:
    """Loss and backward over token chunks of the final hidden states.

    The logits of at most ``chunk_tokens`` tokens exist at any time (one fp32 copy per model),
    instead of two fp32 [B*L, V] tensors: for a 262k vocabulary that is the difference between
    a few hundred MB and tens of GB. ``chunk_tokens <= 0`` picks the chunk from the vocabulary
    size (:func:`auto_chunk_tokens`). Gradients flow into ``student_hidden`` once, at the end.
    Returns (mean loss, top-1 agreement) over all tokens; ``scale`` multiplies the gradient
    (for gradient accumulation).

    KL and reverse KL use closed-form logit gradients (no autograd graph over the vocabulary,
    fewer fp32 temporaries); JSD goes through autograd. ``as_tensors`` returns 0-d device tensors
    instead of floats: no host sync, as a CUDA graph needs. ``teacher_topk`` > 0 (forward KL only)
    sees only the teacher's k most likely tokens per position and the mass of all the others (what
    a cache of top-k teacher log-probabilities holds); top-1 agreement is still against the full teacher.
    ``extra_loss``: a scalar (already scaled) back-propagated in the same backward pass, e.g. the
    intermediate-layer loss of :func:`hidden_match_loss`; it is not added to the returned loss.
    """
    if kind not in LOSSES:
        raise ValueError(f"unknown loss {kind!r}; use one of {LOSSES}")
    if teacher_topk and kind != "kl":
        raise ValueError("teacher_topk needs the forward KL loss (the others need the whole teacher distribution)")
    H = student_hidden.shape[-1]
    hs = student_hidden.reshape(-1, H)
    ht = teacher_hidden.reshape(-1, H)
    n = hs.shape[0]
    if chunk_tokens <= 0:
        chunk_tokens = auto_chunk_tokens(_vocab_of(student_head, hs[:1]), n)
    leaf = hs.detach().requires_grad_(backward)
    # Accumulate on the device: one host sync per step, not one per chunk.
    total = torch.zeros((), device=hs.device)
    agree = torch.zeros((), device=hs.device)
    for i in range(0, n, chunk_tokens):
        with torch.no_grad():
            t_logits = teacher_head(ht[i:i + chunk_tokens])
        with torch.set_grad_enabled(backward):
            s_logits = student_head(leaf[i:i + chunk_tokens])
        with torch.no_grad():
            agree += (s_logits.argmax(-1) == t_logits.argmax(-1)).sum()
        if kind != "jsd":
            with torch.no_grad():
                loss, grad = _kl_value_and_grad(s_logits, t_logits, kind, temperature,
                                                scale / n if backward else None, teacher_topk)
                loss = loss / n
            del t_logits
            if backward:
                s_logits.backward(grad.to(s_logits.dtype))
                del grad
        else:
            with torch.set_grad_enabled(backward):
                loss = divergence(s_logits, t_logits, kind, temperature) / n
                if backward:
                    (loss * scale).backward()
            del t_logits
        del s_logits
        total += loss.detach()
    if backward:
        if extra_loss is not None:  # one pass through the decoder for both losses
            torch.autograd.backward([hs, extra_loss], [leaf.grad, None])
        else:
            hs.backward(leaf.grad)
    if as_tensors:
        return total, agree / n
    return total.item(), agree.item() / n


def hidden_match_loss(student_layers: Sequence[torch.Tensor], teacher_layers: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean over layers and tokens of the relative squared error of each layer's output,
    ||h_s - h_t||^2 / ||h_t||^2 per token: every token weighs the same, whatever its norm (the
    first token's residual stream is orders of magnitude larger than the others')."""
    total = torch.zeros((), device=student_layers[0].device)
    for s, t in zip(student_layers, teacher_layers, strict=True):
        s, t = s.float(), t.float()
        total = total + ((s - t).pow(2).sum(-1) / t.pow(2).sum(-1).clamp_min(1e-12)).mean()
    return total / len(student_layers)
