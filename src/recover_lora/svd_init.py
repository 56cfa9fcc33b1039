"""Data-free warm start: each LoRA pair starts as the truncated SVD of (W_reference - W_degraded).

For a LoRA-wrapped linear with base weight W_deg (out x in), rank r and scaling s (alpha / r, or
alpha / sqrt(r) with rsLoRA, read from the layer), the adapted weight is W_deg + s * B @ A. With
dW = W_ref - W_deg = U S V^T, setting

    B = U_r sqrt(S_r) / sqrt(s),    A = sqrt(S_r) V_r^T / sqrt(s)

makes s * B @ A = U_r S_r V_r^T, the best rank-r approximation of dW (Eckart-Young): exact when
rank(dW) <= r, and with zero training steps this is the training-free low-rank compensation
baseline (ZeroQuant-V2's LoRC). Distillation then continues from there.

``eora`` is the activation-weighted variant (after EoRA, with a diagonal input covariance): the
input dimension is weighted by d_j = sqrt(E[x_j^2]) measured on a few synthetic sequences run
through the reference, the SVD is taken of dW diag(d), and A is unweighted by diag(d)^-1. That
minimises the error on the layer's *outputs* for such inputs, E||(dW - s B A) x||^2, instead of
the weight error.

    student = attach_with_init(degraded, AdapterConfig(init="svd", rank=16), reference)
"""

from __future__ import annotations

import copy
import math
from typing import Mapping

import torch
from peft import PeftModel
from transformers import PreTrainedModel

from .utils import RecoverLoraError, log

SVD_INITS = ("svd", "eora")
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
def input_scales(reference: PreTrainedModel, names: list[str], calib_ids: torch.Tensor,
                 batch_size: int = 8) -> dict[str, torch.Tensor]:
    """sqrt(E[x_j^2]) of the input to each named linear of ``reference`` over ``calib_ids`` tokens
    (the diagonal of the uncentred input covariance), in fp32."""
    from .distill import hidden_states

    device = next(reference.parameters()).device
    sums: dict[str, torch.Tensor] = {}
    count = [0]
    hooks = []

    def hook(name):
        def f(mod, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            s = (x * x).sum(0)
            sums[name] = sums[name] + s if name in sums else s
        return f

    for n in names:
        hooks.append(reference.get_submodule(n).register_forward_pre_hook(hook(n)))
    was_training = reference.training
    reference.eval()
    try:
        for i in range(0, len(calib_ids), batch_size):
            x = calib_ids[i:i + batch_size].to(device)
            hidden_states(reference, x)  # the decoder only: no full-vocabulary logits
            count[0] += x.numel()
    finally:
        for h in hooks:
            h.remove()
        reference.train(was_training)
    if not count[0]:
        raise RecoverLoraError("eora init needs calibration token ids (a few synthetic sequences)")
    return {n: (s / count[0]).sqrt() for n, s in sums.items()}


@torch.no_grad()
def svd_init_(peft_model: torch.nn.Module, reference: PreTrainedModel | Mapping[str, torch.Tensor],
              degraded_state: Mapping[str, torch.Tensor] | None = None, *, kind: str = "svd",
              calib_ids: torch.Tensor | None = None, adapter_name: str | None = None,
              svd_method: str = "auto", calib_batch_size: int = 8) -> dict[str, dict]:
    """Set every LoRA pair of ``peft_model`` from the truncated SVD of its module's weight difference.

    ``reference``: the reference model, or its state dict; modules are matched by name (the
    name inside the base model, e.g. ``model.layers.0.self_attn.q_proj``). ``degraded_state``:
    the degraded weights by the same ``<name>.weight`` keys, when the LoRA layer's base weight is
    not them (default: the base layer's weight). ``kind``: ``svd`` or ``eora`` (needs
    ``calib_ids``, token ids [N, L], and a reference model). Per-module ranks (``rank_pattern``)
    and rsLoRA scaling are read from each layer. The SVD is computed in fp32 on the base weight's
    device; the result is cast to the LoRA weights' dtype. Returns, per module, the rank, the
    relative norm of dW and the relative residual ||dW - s B A||_F / ||dW||_F
    (the relative weighted residual for eora).
    """
    if kind not in SVD_INITS:
        raise RecoverLoraError(f"unknown svd init {kind!r}; use one of {SVD_INITS}")
    if adapter_name is None:
        adapter_name = getattr(peft_model, "active_adapter", "default")
        if isinstance(adapter_name, (list, tuple)):
            adapter_name = adapter_name[0]
    layers = list(_lora_layers(peft_model, adapter_name))
    if not layers:
        raise RecoverLoraError(f"svd init: the model has no LoRA layer for adapter {adapter_name!r}")
    scales = None
    if kind == "eora":
        if calib_ids is None or isinstance(reference, Mapping):
            raise RecoverLoraError("eora init needs the reference model and calibration token ids")
        scales = input_scales(reference, [n for n, _ in layers], calib_ids, calib_batch_size)
    stats: dict[str, dict] = {}
    for name, layer in layers:
        if getattr(layer, "use_dora", {}).get(adapter_name, False):
            raise RecoverLoraError(f"svd init does not support DoRA ({name})")
        base_w = layer.get_base_layer().weight
        if base_w.ndim != 2 or not base_w.dtype.is_floating_point:
            raise RecoverLoraError(f"svd init: {name} has a {base_w.dtype} {tuple(base_w.shape)} base weight "
                                   "(quantized or not a linear layer); pass degraded_state")
        device = base_w.device
        w_deg = degraded_state[f"{name}.weight"] if degraded_state is not None else base_w
        w_ref = _reference_weight(reference, name)
        w_deg = w_deg.to(device=device, dtype=torch.float32)
        w_ref = w_ref.to(device=device, dtype=torch.float32)
        if getattr(layer, "fan_in_fan_out", False):  # Conv1D-style (in, out) storage
            w_deg, w_ref = w_deg.T, w_ref.T
        if w_ref.shape != w_deg.shape:
            raise RecoverLoraError(f"svd init: {name} is {tuple(w_ref.shape)} in the reference and "
                                   f"{tuple(w_deg.shape)} in the degraded model")
        dw = w_ref - w_deg
        if not torch.isfinite(dw).all():
            raise RecoverLoraError(f"svd init: {name} has NaN/Inf in its weight difference")
        A_mod, B_mod = layer.lora_A[adapter_name], layer.lora_B[adapter_name]
        r = A_mod.weight.shape[0]
        s = float(layer.scaling[adapter_name])
        out_f, in_f = dw.shape
        k = min(r, out_f, in_f)
        if scales is not None:
            d = scales[name].to(device)
            d = d.clamp_min(max(d.max().item() * 1e-6, 1e-12))
            U, S, V = truncated_svd(dw * d, k, svd_method)
            V = V / d[:, None]  # unweight: dW ~= U S (V / d)^T
        else:
            U, S, V = truncated_svd(dw, k, svd_method)
        root = S.clamp_min(0).sqrt()
        B = torch.zeros(out_f, r, device=device)
        A = torch.zeros(r, in_f, device=device)
        B[:, :k] = U * root / math.sqrt(s)
        A[:k] = (V * root).T / math.sqrt(s)
        B_mod.weight.copy_(B.to(B_mod.weight.dtype))
        A_mod.weight.copy_(A.to(A_mod.weight.dtype))
        approx = s * (B_mod.weight.float() @ A_mod.weight.float())
        if scales is not None:
            d = scales[name].to(device)
            err = ((dw - approx) * d).norm() / max((dw * d).norm().item(), 1e-30)
        else:
            err = (dw - approx).norm() / max(dw.norm().item(), 1e-30)
        stats[name] = {"rank": r, "rel_dw": dw.norm().item() / max(w_ref.norm().item(), 1e-30),
                       "rel_residual": err.item()}
    mean_res = sum(v["rel_residual"] for v in stats.values()) / len(stats)
    log.info("%s init of %d LoRA pairs: mean relative residual of the weight difference %.4f",
             kind, len(stats), mean_res)
    return stats


def attach_with_init(model: PreTrainedModel, cfg, reference: PreTrainedModel, seed: int = 0,
                     calib_ids: torch.Tensor | None = None, calib_sequences: int = 32) -> PeftModel:
    """``distill.attach_adapters`` that also understands ``cfg.init`` in :data:`SVD_INITS`:
    attach with PEFT's default init, then overwrite every pair with :func:`svd_init_`.
    Any other ``init`` goes to PEFT unchanged. ``calib_ids`` (eora): synthetic token ids, of
    which the first ``calib_sequences`` are used."""
    from .distill import attach_adapters

    if cfg.init not in SVD_INITS:
        return attach_adapters(model, cfg, seed=seed)
    plain = copy.copy(cfg)
    plain.init = "default"
    student = attach_adapters(model, plain, seed=seed)
    ids = calib_ids[:calib_sequences] if calib_ids is not None else None
    svd_init_(student, reference, kind=cfg.init, calib_ids=ids)
    return student
