"""What an adapter was trained on, written beside it, and checked wherever it is applied.

``recover`` writes ``adapter/recover_lora.json`` (the degraded model's architecture signature
and fingerprint, and the NaN/Inf weights it zeroed). :func:`apply_adapter`, the one way this
package puts an adapter on a model (eval, export, the study), refuses a model of another
architecture or vocabulary by name, and applies the same NaN/Inf fix the training saw.

Non-finite weights get one behaviour everywhere: an additive adapter cannot cancel a NaN or Inf
weight (W + BA stays non-finite), so ``recover`` zeroes them, says so, and records them here;
a consumer that finds non-finite weights an adapter does not record refuses the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .utils import RecoverLoraError, atomic_write_json, log, read_json

SIDECAR = "recover_lora.json"
SIGNATURE_KEYS = ("model_type", "num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
                  "intermediate_size")


def model_signature(model: torch.nn.Module) -> dict[str, Any]:
    """The architecture facts two models must share for one's adapter to mean anything on the other."""
    from .load import vocab_size

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    sig = {k: getattr(base.config, k, None) for k in SIGNATURE_KEYS}
    sig["vocab_size"] = vocab_size(base)
    return sig


def nonfinite_weights(model: torch.nn.Module) -> dict[str, int]:
    """{parameter name: number of NaN/Inf entries} for every parameter that has any."""
    out = {}
    for name, p in model.named_parameters():
        n = int((~torch.isfinite(p.detach())).sum())
        if n:
            out[name] = n
    return out


@torch.no_grad()
def zero_nonfinite(model: torch.nn.Module) -> dict[str, int]:
    """Zero every NaN/Inf weight in place (loudly); returns {parameter: count}."""
    fixed = nonfinite_weights(model)
    for name, p in model.named_parameters():
        if name in fixed:
            p.masked_fill_(~torch.isfinite(p), 0.0)
    if fixed:
        log.warning("the degraded model holds NaN/Inf weights; zeroed (and recorded with the adapter) in %d "
                    "tensors: %s", len(fixed), dict(list(fixed.items())[:5]))
    return fixed


def write_adapter_provenance(adapter_dir: str | Path, model: torch.nn.Module, **facts: Any) -> None:
    """Record the degraded model's signature and ``facts`` (fingerprint, zeroed weights, specs) beside the adapter."""
    atomic_write_json(Path(adapter_dir) / SIDECAR, {"degraded_signature": model_signature(model), **facts})


def check_pairing(adapter_dir: str | Path, model: torch.nn.Module) -> dict[str, Any]:
    """Refuse a model the adapter was not trained for (architecture, sizes, vocabulary); returns the sidecar."""
    path = Path(adapter_dir) / SIDECAR
    if not path.exists():
        log.warning("%s has no %s (not written by recover-lora): its pairing with the model is not checked",
                    adapter_dir, SIDECAR)
        return {}
    side = read_json(path)
    want, have = side.get("degraded_signature", {}), model_signature(model)
    for k, v in want.items():
        if have.get(k) != v:
            raise RecoverLoraError(f"adapter {adapter_dir} was trained on a model with {k} {v!r}; this model has "
                                   f"{have.get(k)!r}: it does not fit")
    return side


def apply_adapter(model: torch.nn.Module, adapter_dir: str | Path):
    """``PeftModel.from_pretrained`` after checking the pairing and applying the recorded NaN/Inf fix."""
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").exists():
        raise RecoverLoraError(f"{adapter_dir} is not a PEFT adapter folder (no adapter_config.json)")
    side = check_pairing(adapter_dir, model)
    bad = nonfinite_weights(model)
    if bad:
        recorded = set(side.get("zeroed_nonfinite") or {})
        if not set(bad) <= recorded:
            raise RecoverLoraError(f"the model holds NaN/Inf weights ({dict(list(bad.items())[:3])}) that adapter "
                                   f"{adapter_dir} was not trained with; an adapter cannot cancel them")
        zero_nonfinite(model)
    peft = PeftModel.from_pretrained(model, str(adapter_dir))
    peft.eval()
    return peft
