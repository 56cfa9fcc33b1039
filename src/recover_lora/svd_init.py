"""Data-free warm start: each LoRA pair starts as the best rank-r fix of (W_reference - W_degraded).

For a LoRA-wrapped linear with base weight W_deg (out x in), rank r and scaling s (alpha / r, or
alpha / sqrt(r) with rsLoRA, read from the layer), the adapted weight is W_deg + s * B @ A. Let
dW = W_ref - W_deg and R a weighting of the input dimension. The rank-r matrix closest to dW in
the norm ||(.) R||_F is U_r U_r^T dW, where U_r holds the top-r left singular vectors of dW R;
B and A split it, each component's norm shared evenly between them (both divided by sqrt(s)).

- ``svd``: R = I, the truncated SVD of dW itself (Eckart-Young): exact when rank(dW) <= r; with
  zero training steps the training-free low-rank compensation baseline (ZeroQuant-V2's LoRC).
- ``eora``: R R^T = E[x x^T], the uncentred covariance of the layer's inputs in the *reference*
  on a few synthetic sequences (EoRA's eigenspace projection): the rank-r fix with the smallest
  output error E||(dW - s B A) x||^2 on such inputs. Damage in directions the inputs never take
  costs nothing, so the rank goes where the activations are.
  The covariance is shrunk a quarter of the way toward its diagonal (``shrink``,
  :data:`EORA_SHRINK`): 32 x 64 calibration tokens estimate a 576- or 1536-dimensional covariance
  poorly; on SmolLM2 the shrunk estimate lowered the held-out KL at init by 7% (noise on every
  linear) and 40% (noise on K/V) for 1.6% more on 3-bit MLP rounding (docs/warm_start.md).
- ``eora-diag``: R = diag(sqrt(E[x_j^2])), the diagonal of that covariance only (= ``eora`` at
  shrink 1).

Distillation then continues from there.

    student = attach_adapters(degraded, AdapterConfig(init="svd", rank=16), reference=reference)
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
from peft import PeftModel
from transformers import PreTrainedModel

from .utils import RecoverLoraError, log

from .config import SVD_INITS  # noqa: E402,F401 - its home is the config
CALIB_SEQUENCES = 32  # eora: synthetic sequences whose reference activations give the input covariance
EORA_SHRINK = 0.25  # eora: covariance used = (1 - shrink) E[x x^T] + shrink diag(E[x x^T])
FULL_SVD_MAX_DIM = 8192  # exact SVD up to this min(out, in); randomized svd_lowrank above


def _lora_layers(peft_model: torch.nn.Module, adapter_name: str):
    """(name relative to the base model, LoRA layer) for every layer carrying ``adapter_name``."""
    from peft.tuners.lora import LoraLayer

    base = peft_model.get_base_model() if isinstance(peft_model, PeftModel) else peft_model
    for name, mod in base.named_modules():
        if isinstance(mod, LoraLayer) and adapter_name in getattr(mod, "lora_A", {}):
            yield name, mod


def _reference_weight(reference, name: str) -> torch.Tensor:
    if isinstance(reference, Mapping):
        key = f"{name}.weight"
        if key not in reference:
            raise RecoverLoraError(f"svd init: the reference has no tensor {key}")
        return reference[key]
    try:
        mod = reference.get_submodule(name)
    except AttributeError:
        raise RecoverLoraError(f"svd init: the reference has no module {name}") from None
    return mod.weight


def truncated_svd(m: torch.Tensor, r: int, method: str = "auto", niter: int = 6):
    """(U_r, S_r, V_r) of a 2-D fp32 matrix: exact ``torch.linalg.svd`` or randomized ``svd_lowrank``."""
    k = min(m.shape)
    if method == "auto":
        method = "full" if k <= FULL_SVD_MAX_DIM else "lowrank"
    if method == "full":
        U, S, Vh = torch.linalg.svd(m, full_matrices=False)
        return U[:, :r], S[:r], Vh[:r].T
    if method == "lowrank":
        q = min(k, r + max(10, r // 2))
        U, S, V = torch.svd_lowrank(m, q=q, niter=niter)
        return U[:, :r], S[:r], V[:, :r]
    raise RecoverLoraError(f"unknown svd method {method!r}; use auto, full or lowrank")


@torch.no_grad()
def input_moments(reference: PreTrainedModel, names: list[str], calib_ids: torch.Tensor, batch_size: int = 8,
                  full: bool = True) -> dict[str, torch.Tensor]:
    """The uncentred second moment of the input to each named linear of ``reference`` over the
    ``calib_ids`` tokens, in fp32: ``E[x x^T]`` (in x in) with ``full``, else its diagonal
    ``E[x_j^2]``. Linears fed the same tensor (q/k/v, gate/up) share one matrix."""
    from .forward import hidden_states

    device = next(reference.parameters()).device
    sums: dict[str, torch.Tensor] = {}
    alias: dict[str, str] = {}  # name -> the name whose sum it shares
    seen: dict[int, tuple[torch.Tensor, str]] = {}  # id(input) -> (input kept alive, first name); per batch
    count = [0]
    hooks = []

    def hook(name):
        def f(mod, args):
            x = args[0]
            if id(x) in seen and seen[id(x)][0] is x:
                alias[name] = seen[id(x)][1]
                return
            seen[id(x)] = (x, name)
            x = x.detach().reshape(-1, x.shape[-1]).float()
            s = x.T @ x if full else (x * x).sum(0)
            sums[name] = sums[name] + s if name in sums else s
        return f

    for n in names:
        hooks.append(reference.get_submodule(n).register_forward_pre_hook(hook(n)))
    was_training = reference.training
    reference.eval()
    try:
        for i in range(0, len(calib_ids), batch_size):
            x = calib_ids[i:i + batch_size].to(device)
            seen.clear()
            hidden_states(reference, x)  # the decoder only: no full-vocabulary logits
            count[0] += x.numel()
    finally:
        seen.clear()
        for h in hooks:
            h.remove()
        reference.train(was_training)
    if not count[0]:
        raise RecoverLoraError("eora init needs calibration token ids (a few synthetic sequences)")
    out = {n: v / count[0] for n, v in sums.items()}
    out.update({n: out[a] for n, a in alias.items() if n not in out})
    return out


def _root(cov: torch.Tensor) -> torch.Tensor:
    """R with R R^T = cov (symmetric PSD).

    Only R R^T enters the solution (the left singular vectors of dW R are the eigenvectors of
    dW cov dW^T) and the residual norm, so any root serves: the Cholesky factor, far cheaper than
    an eigendecomposition (Qwen2.5-0.5B's EoRA start on a 2-core CPU: 7m35s -> 2m45s, docs/gguf_export.md).
    A covariance that is only semi-definite (a dead input channel, plain EoRA on fewer tokens
    than channels) takes the eigendecomposition.
    """
    L, info = torch.linalg.cholesky_ex(cov)
    if int(info) == 0 and bool(torch.isfinite(L).all()):
        return L
    evals, evecs = torch.linalg.eigh(cov)
    return evecs * evals.clamp_min(0).sqrt()


def _input_roots(reference: PreTrainedModel, names: list[str], calib_ids: torch.Tensor, batch_size: int, kind: str,
                 shrink: float) -> dict[str, torch.Tensor]:
    """Per module, R with R R^T its input's second moment (eora; shrunk toward the diagonal by
    ``shrink``) or R's diagonal (eora-diag); linears that share an input share one root."""
    moments = input_moments(reference, names, calib_ids, batch_size, full=kind == "eora")
    roots: dict[int, torch.Tensor] = {}
    weights: dict[str, torch.Tensor] = {}
    for n, m in moments.items():
        if id(m) not in roots:
            if kind == "eora":
                c = (1 - shrink) * m + shrink * torch.diag(torch.diagonal(m)) if shrink else m
                roots[id(m)] = _root(c)
            else:
                roots[id(m)] = m.sqrt()  # eora-diag: R's diagonal
        weights[n] = roots[id(m)]
    return weights


def _difference(layer, name: str, reference, degraded_state) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference weight and dW = W_ref - W_deg of one LoRA layer's module, fp32 on its device."""
    base_w = layer.get_base_layer().weight
    if base_w.ndim != 2 or not base_w.dtype.is_floating_point:
        raise RecoverLoraError(f"svd init: {name} has a {base_w.dtype} {tuple(base_w.shape)} base weight "
                               "(quantized or not a linear layer); pass degraded_state")
    device = base_w.device
    w_deg = degraded_state[f"{name}.weight"] if degraded_state is not None else base_w
    w_deg = w_deg.to(device=device, dtype=torch.float32)
    w_ref = _reference_weight(reference, name).to(device=device, dtype=torch.float32)
    if getattr(layer, "fan_in_fan_out", False):  # Conv1D-style (in, out) storage
        w_deg, w_ref = w_deg.T, w_ref.T
    if w_ref.shape != w_deg.shape:
        raise RecoverLoraError(f"svd init: {name} is {tuple(w_ref.shape)} in the reference and "
                               f"{tuple(w_deg.shape)} in the degraded model")
    dw = w_ref - w_deg
    if not torch.isfinite(dw).all():
        raise RecoverLoraError(f"svd init: {name} has NaN/Inf in its weight difference")
    return w_ref, dw


@torch.no_grad()
def svd_init_(peft_model: torch.nn.Module, reference: PreTrainedModel | Mapping[str, torch.Tensor],
              degraded_state: Mapping[str, torch.Tensor] | None = None, *, kind: str = "svd",
              calib_ids: torch.Tensor | None = None, adapter_name: str | None = None,
              svd_method: str = "auto", calib_batch_size: int = 8,
              shrink: float = EORA_SHRINK) -> dict[str, dict]:
    """Set every LoRA pair of ``peft_model`` from the truncated SVD of its module's weight difference.

    ``reference``: the reference model, or its state dict; modules are matched by name (the
    name inside the base model, e.g. ``model.layers.0.self_attn.q_proj``). ``degraded_state``:
    the degraded weights by the same ``<name>.weight`` keys, when the LoRA layer's base weight is
    not them (default: the base layer's weight). ``kind``: ``svd``, ``eora`` or ``eora-diag``
    (both need ``calib_ids``, token ids [N, L], and a reference model); ``shrink`` (eora): the
    weight of the diagonal in the covariance, 0 = EoRA's plain estimate. Per-module ranks
    (``rank_pattern``) and rsLoRA scaling are read from each layer. The SVD is computed in fp32
    on the base weight's device; the result is cast to the LoRA weights' dtype. Returns, per
    module, the rank, the relative norm of dW and the relative residual ||(dW - s B A) R||_F /
    ||dW R||_F (R = I for svd).
    """
    if kind not in SVD_INITS:
        raise RecoverLoraError(f"unknown svd init {kind!r}; use one of {SVD_INITS}")
    if not 0.0 <= shrink <= 1.0:
        raise RecoverLoraError(f"eora shrink must be in [0, 1], got {shrink}")
    if adapter_name is None:
        adapter_name = getattr(peft_model, "active_adapter", "default")
        if isinstance(adapter_name, (list, tuple)):
            adapter_name = adapter_name[0]
    layers = list(_lora_layers(peft_model, adapter_name))
    if not layers:
        raise RecoverLoraError(f"svd init: the model has no LoRA layer for adapter {adapter_name!r}")
    weights: dict[str, torch.Tensor] = {}  # name -> R: the error is measured as ||(dW - s B A) R||
    if kind in ("eora", "eora-diag"):
        if calib_ids is None or isinstance(reference, Mapping):
            raise RecoverLoraError(f"{kind} init needs the reference model and calibration token ids")
        weights = _input_roots(reference, [n for n, _ in layers], calib_ids, calib_batch_size, kind, shrink)
    stats: dict[str, dict] = {}
    for name, layer in layers:
        if getattr(layer, "use_dora", {}).get(adapter_name, False):
            raise RecoverLoraError(f"svd init does not support DoRA ({name})")
        w_ref, dw = _difference(layer, name, reference, degraded_state)
        device = dw.device
        A_mod, B_mod = layer.lora_A[adapter_name], layer.lora_B[adapter_name]
        r = A_mod.weight.shape[0]
        s = float(layer.scaling[adapter_name])
        out_f, in_f = dw.shape
        k = min(r, out_f, in_f)
        R = weights[name].to(device) if name in weights else None

        def weigh(m: torch.Tensor) -> torch.Tensor:  # m R (R a vector: a diagonal)
            return m if R is None else m * R if R.ndim == 1 else m @ R

        # The best rank-k approximation of dW in the norm ||. R|| is U_k U_k^T dW, U_k the top-k
        # left singular vectors of dW R (R = I: the truncated SVD of dW itself)
        dw_w = weigh(dw)
        U, _, _ = truncated_svd(dw_w, k, svd_method)
        P = U.T @ dw  # k x in
        norms = P.norm(dim=1)
        a = norms.clamp_min(1e-30).sqrt()  # split each component's norm evenly between B and A
        # Components the difference does not fill (an undamaged module, rank(dW) < r, r > min(out, in))
        # keep PEFT's default init, A random and B zero: the same function, but still trainable
        # (B = A = 0 would get no gradient at all).
        B = torch.zeros(out_f, r, device=device)
        A = A_mod.weight.detach().float().clone()  # PEFT's init, kept where not live
        live = torch.zeros(r, dtype=torch.bool, device=device)
        live[:k] = norms > 1e-6 * dw.norm()
        B[:, :k] = U * a / math.sqrt(s)
        A[:k] = P / a[:, None] / math.sqrt(s)
        B[:, ~live] = 0
        A[~live] = A_mod.weight.detach().float()[~live]  # (A[:k] was overwritten above)
        B_mod.weight.copy_(B.to(B_mod.weight.dtype))
        A_mod.weight.copy_(A.to(A_mod.weight.dtype))
        res = weigh(dw - s * (B_mod.weight.float() @ A_mod.weight.float()))
        stats[name] = {"rank": r, "rel_dw": dw.norm().item() / max(w_ref.norm().item(), 1e-30),
                       "rel_residual": res.norm().item() / max(dw_w.norm().item(), 1e-30)}
    mean_res = sum(v["rel_residual"] for v in stats.values()) / len(stats)
    log.info("%s init of %d LoRA pairs: mean relative residual of the weight difference %.4f",
             kind, len(stats), mean_res)
    return stats
