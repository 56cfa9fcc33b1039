"""Adapters: an :class:`AdapterPlan` says which linear modules get a LoRA and at what rank, and
:func:`attach` is the one way one goes on a model. A preset (``kv``, ``attn-mlp`` ... at one rank)
is a plan of uniform ranks (:func:`preset_plan`); ``recover --placement auto`` plans per-module
ranks from a diagnosis (:mod:`recover_lora.placement`). Either is an ordinary PEFT ``LoraConfig``
(explicit full-name ``target_modules`` plus ``rank_pattern`` / ``alpha_pattern``), so the saved
adapter reloads with ``PeftModel.from_pretrained(degraded, folder)``; the svd / eora warm starts
(:mod:`recover_lora.svd_init`) overwrite the fresh pairs after attaching.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from .config import SVD_INITS, AdapterConfig, parse_layers
from .modules import parse_modules, select_modules
from .utils import RecoverLoraError, atomic_write_json, read_json


@dataclass
class AdapterPlan:
    """Per-module LoRA ranks chosen from a diagnosis."""

    ranks: dict[str, int]  # full module name -> rank (model order)
    base_rank: int = 16
    alpha_ratio: float = 2.0  # lora_alpha / r, the same on every module
    dropout: float = 0.0
    init: str = "default"  # peft init_lora_weights: default | gaussian | pissa | olora
    budget: int = 0
    parameters: int = 0  # trainable parameters of the plan
    scores: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    # -- PEFT ------------------------------------------------------------------------------
    def peft_config(self) -> LoraConfig:
        if not self.ranks:
            raise RecoverLoraError("the adapter plan is empty: no damaged module to adapt")
        # svd / eora warm starts are applied after attaching (attach)
        init: bool | str = True if self.init in ("default",) + SVD_INITS else self.init
        # rank/alpha patterns are regexes matched against the end of the module name: escape them.
        return LoraConfig(r=self.base_rank, lora_alpha=self.alpha_ratio * self.base_rank,
                          lora_dropout=self.dropout, target_modules=list(self.ranks),
                          rank_pattern={re.escape(n): r for n, r in self.ranks.items()},
                          alpha_pattern={re.escape(n): self.alpha_ratio * r for n, r in self.ranks.items()},
                          init_lora_weights=init, bias="none", task_type="CAUSAL_LM")

    # -- (de)serialisation -----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = self.layers()
        d["module_types"] = sorted({n.rsplit(".", 1)[-1] for n in self.ranks})
        d["modules"] = len(self.ranks)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AdapterPlan":
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})

    def save(self, path: str | Path) -> Path:
        atomic_write_json(path, self.to_dict())
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> "AdapterPlan":
        return cls.from_dict(read_json(path))

    # -- description -----------------------------------------------------------------------
    def layers(self) -> list[int]:
        out = set()
        for n in self.ranks:
            m = re.search(r"(?:^|\.)layers\.(\d+)\.", n)
            if m:
                out.add(int(m.group(1)))
        return sorted(out)

    def summary(self) -> str:
        if not self.ranks:
            why = f" ({'; '.join(self.notes)})" if self.notes else ""
            return "no adapters: no damaged decoder linear module" + why
        by_layer: dict[str, list[str]] = {}
        for n, r in self.ranks.items():
            m = re.search(r"(?:^|\.)layers\.(\d+)\.", n)
            by_layer.setdefault(m.group(1) if m else "?", []).append(f"{n.rsplit('.', 1)[-1]}:{r}")
        parts = [f"L{k} " + ",".join(v) for k, v in by_layer.items()]
        shown = "; ".join(parts[:12]) + (f"; ... ({len(parts) - 12} more layers)" if len(parts) > 12 else "")
        return (f"{len(self.ranks)} modules in {len(by_layer)} layers, {self.parameters:,} trainable parameters "
                f"of a {self.budget:,} budget: {shown}")


def adapter_targets(cfg: AdapterConfig, model: nn.Module) -> list[str]:
    """Full names of the nn.Linear modules that get an adapter (same selection rules as degrade)."""
    layers = parse_layers(cfg.layers)
    patterns = parse_modules(cfg.modules) or ["all-linear"]
    names = [n for n, m in select_modules(model, patterns, layers) if isinstance(m, torch.nn.Linear)]
    if not names:
        raise RecoverLoraError(f"adapter targets {cfg.modules!r} (layers {cfg.layers}) match no linear module "
                               f"of this {model.config.model_type} model")
    return names


def preset_plan(cfg: AdapterConfig, model: nn.Module) -> AdapterPlan:
    """``cfg``'s modules (a preset, names or re:REGEX, on ``cfg.layers``) at ``cfg.rank`` each."""
    names = adapter_targets(cfg, model)
    mods = dict(model.named_modules())
    return AdapterPlan(ranks={n: cfg.rank for n in names}, base_rank=cfg.rank, alpha_ratio=cfg.alpha / cfg.rank,
                       dropout=cfg.dropout, init=cfg.init,
                       parameters=sum(cfg.rank * (mods[n].in_features + mods[n].out_features) for n in names))


def attach(model: nn.Module, plan: AdapterPlan, seed: int = 0, reference: nn.Module | None = None,
           calib_ids: torch.Tensor | None = None, calib_sequences: int | None = None,
           shrink: float | None = None) -> PeftModel:
    """Wrap ``model`` with fresh LoRA adapters as ``plan`` says (only they are trainable).

    ``plan.init`` svd / eora / eora-diag attaches with PEFT's default init and then sets every pair
    from the weight difference to ``reference`` (:func:`recover_lora.svd_init.svd_init_`, which
    reads the per-module ranks); the first ``calib_sequences`` (default 32) of ``calib_ids`` are the
    eora calibration sequences, its covariance shrunk by ``shrink`` (default EORA_SHRINK).
    """
    mods = dict(model.named_modules())
    bad = [n for n in plan.ranks if not isinstance(mods.get(n), nn.Linear)]
    if bad:
        raise RecoverLoraError(f"adapter plan names modules this model lacks (or not Linear): {bad[:5]}")
    torch.manual_seed(seed)
    student = get_peft_model(model, plan.peft_config())
    if plan.init in SVD_INITS:
        if reference is None:
            raise RecoverLoraError(f"init {plan.init!r} needs the reference model")
        from .svd_init import CALIB_SEQUENCES, EORA_SHRINK, svd_init_

        n = CALIB_SEQUENCES if calib_sequences is None else calib_sequences
        svd_init_(student, reference, kind=plan.init, calib_ids=calib_ids[:n] if calib_ids is not None else None,
                  shrink=EORA_SHRINK if shrink is None else shrink)
    return student
