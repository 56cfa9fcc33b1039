"""Recover-LoRA (the paper's method): LoRA adapters on the degraded model, placed by a preset or by
the diagnosis (``--placement auto``), optionally warm-started (svd / eora), distilled from the
reference's logits on its synthetic text."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from ..adapters import attach, preset_plan
from ..distill import train
from ..forward import trainable_parameters
from .base import Method


def placement_plan(cfg, reference, degraded, tokenizer, held_ids, write: bool = True):
    """``--placement auto``: diagnose on ``held_ids`` and plan per-module ranks, or reuse
    ``out_dir/diagnosis/plan.json`` (a resumed run, or one given a sibling's plan)."""
    from ..placement import auto_plan

    return auto_plan(reference, degraded, tokenizer, held_ids, Path(cfg.out_dir) / "diagnosis",
                     rank=cfg.adapter.rank, alpha=cfg.adapter.alpha, budget=cfg.placement_budget,
                     dropout=cfg.adapter.dropout, init=cfg.adapter.init, write=write)


def adapter_student(r) -> None:
    """Fresh adapters by plan: auto (diagnosis) or a preset (cfg.adapter's modules at one rank)."""
    cfg = r.cfg
    r.plan = placement_plan(cfg, r.reference, r.degraded, r.tokenizer, r.held_ids, r.rank == 0) \
        if cfg.placement == "auto" else preset_plan(cfg.adapter, r.degraded)
    r.n_modules = len(r.plan.ranks)
    r.student = attach(r.degraded, r.plan, seed=cfg.distill.seed, reference=r.reference,
                       calib_ids=r.train_ids if r.train_ids is not None else r.held_ids)
    r.n_train = trainable_parameters(r.student)


def adapter_identity(cfg) -> dict:
    return {"adapter": asdict(cfg.adapter), "placement": cfg.placement, "placement_budget": cfg.placement_budget}


def _train(r, metrics):
    return train(r.student, r.reference, r.train_ids, r.cfg.distill, r.held_ids, r.out / "checkpoint.pt",
                 progress=r.progress, metrics=metrics), None


METHOD = Method("recover-lora", adapters=True, synthetic=True, student=adapter_student, train=_train,
                identity=adapter_identity)
