"""Automatic adapter placement from a damage diagnosis (``recover --placement auto``).

Every damaged decoder linear gets a score: its weight damage (relative L2 of dW) times the
functional importance of its block (the held-out KL reduction obtained by restoring that layer's
attention or MLP, or the whole layer, to the reference; see :mod:`recover_lora.diagnose`),
normalised to the most important block. Weights with NaN/Inf score above everything else.
Undamaged modules get nothing.

Ranks are then handed out by water-filling within a trainable-parameter budget (a LoRA of rank r
on a Linear(in, out) costs ``r * (in + out)``): the next upgrade (0 -> 4 -> 8 -> ... -> 4x the base
rank, capped at ``min(in, out)``) goes to the module with the highest ``score ** temper / new_rank``
that still fits, so ranks end up roughly proportional to ``score ** temper`` (temper 0.5 by
default). The default budget is what the ``attn-mlp`` preset costs at the base rank on all layers.

The result, an :class:`AdapterPlan`, is an ordinary PEFT ``LoraConfig``: explicit full-name
``target_modules`` plus ``rank_pattern`` and ``alpha_pattern`` (alpha / r constant), so the saved
adapter reloads with ``PeftModel.from_pretrained(degraded, folder)``.
"""

from __future__ import annotations

import heapq
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .modules import select_modules
from .adapters import AdapterPlan  # noqa: F401 - re-exported
from .utils import RecoverLoraError, log

RANK_FACTORS = (0.25, 0.5, 1, 2, 4)
FUNCTIONAL_FLOOR = 0.01  # a damaged block whose restoration shows no KL gain still scores this share


def lora_parameters(model: nn.Module, names: list[str] | dict[str, int], rank: int | None = None) -> int:
    """Trainable parameters of LoRA on the named Linear modules: sum of r * (in + out)."""
    mods = dict(model.named_modules())
    ranks = names if isinstance(names, dict) else {n: rank for n in names}
    return sum(r * (mods[n].in_features + mods[n].out_features) for n, r in ranks.items())


def preset_budget(model: nn.Module, rank: int = 16, preset: str = "attn-mlp") -> int:
    """Parameter count of ``preset`` at ``rank`` on all layers (all-linear if the preset matches nothing)."""
    names = [n for n, m in select_modules(model, [preset]) if isinstance(m, nn.Linear)]
    if not names:
        names = [n for n, m in select_modules(model, ["all-linear"]) if isinstance(m, nn.Linear)]
    return lora_parameters(model, names, rank)


def _f(x: Any) -> float | None:
    """A number from a diagnosis field ("inf" strings included); None when absent."""
    if x is None:
        return None
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def module_scores(diagnosis: dict[str, Any]) -> dict[str, float]:
    """Damage score per module (see the module docstring); only damaged modules appear."""
    layers = {L["layer"]: L for L in diagnosis.get("layers", [])}
    functional = diagnosis.get("functional") is not None
    # functional importance of each (layer, group), normalised to the largest finite one
    raw: dict[tuple[int, str], float] = {}
    for i, L in layers.items():
        for g, G in L.get("groups", {}).items():
            v = _f(G.get("kl_reduction"))
            if v is None:
                v = _f(L.get("kl_reduction"))
            raw[(i, g)] = max(0.0, v) if v is not None else 0.0
    finite = [v for v in raw.values() if math.isfinite(v)]
    top = max(finite, default=0.0)

    def importance(layer: int | None, group: str) -> float:
        if not functional or layer is None:
            return 1.0
        v = raw.get((layer, group), 0.0)
        if not math.isfinite(v):
            return 1.0
        return max(v / top if top > 0 else 0.0, FUNCTIONAL_FLOOR)

    scores: dict[str, float] = {}
    nonfinite: list[str] = []
    for name, e in diagnosis["modules"].items():
        if e.get("nan") or e.get("inf"):
            nonfinite.append(name)
            continue
        rel = e.get("rel_l2") or 0.0
        if rel <= 0:
            continue
        scores[name] = rel * importance(e.get("layer"), e.get("group", "other"))
    top_score = max(scores.values(), default=1.0)
    for name in nonfinite:  # NaN/Inf: above everything
        scores[name] = 10.0 * top_score
    order = list(diagnosis["modules"])
    return {n: scores[n] for n in order if n in scores}


def auto_placement(diagnosis: dict[str, Any], model: nn.Module, rank: int = 16, budget: int | None = None,
                   alpha: float | None = None, rank_choices: tuple[int, ...] | None = None, dropout: float = 0.0,
                   init: str = "default", temper: float = 0.5) -> AdapterPlan:
    """Choose modules, layers and per-module ranks from ``diagnosis`` within ``budget`` parameters.

    ``model`` (the degraded model, plain or PEFT-free) provides the Linear shapes. ``budget``
    defaults to the ``attn-mlp`` preset at ``rank`` on all layers; ``alpha`` to ``2 * rank``
    (the ratio alpha / r is kept on every module); ``rank_choices`` to ``rank`` x (1/4 .. 4).
    ``temper``: ranks grow roughly as ``score ** temper``: 1 = proportional to the damage score,
    0 = equal ranks on every damaged module (placement decides only *where*). On tiny Llama
    tests (60 distillation steps, one seed) 0.5 matched or beat the attn-mlp preset at the same
    budget for uniform noise and for a planted single-layer damage; 1 concentrated too much.
    """
    if rank < 1:
        raise RecoverLoraError("rank must be >= 1")
    alpha = 2.0 * rank if alpha is None else float(alpha)
    budget = preset_budget(model, rank) if budget is None else int(budget)
    choices = sorted({max(1, int(round(rank * f))) for f in RANK_FACTORS}) if rank_choices is None \
        else sorted({int(r) for r in rank_choices if r >= 1})
    mods = dict(model.named_modules())
    scores = module_scores(diagnosis)
    notes: list[str] = []
    missing = [n for n in scores if not isinstance(mods.get(n), nn.Linear)]
    if missing:
        raise RecoverLoraError(f"the diagnosis names modules this model lacks (or not Linear): {missing[:5]}")
    if any(diagnosis["modules"][n].get("nan") or diagnosis["modules"][n].get("inf") for n in scores):
        notes.append("NaN/Inf weights: LoRA cannot cancel them; recover zeroes them first and records that "
                     "with the adapter (recover_lora.provenance.zero_nonfinite)")
    if diagnosis.get("other_tensors"):
        notes.append("damaged tensors outside the decoder linears (embeddings, norms, head) are not adapted: "
                     + ", ".join(list(diagnosis["other_tensors"])[:5]))

    width = {n: mods[n].in_features + mods[n].out_features for n in scores}
    cap = {n: min(mods[n].in_features, mods[n].out_features, choices[-1]) for n in scores}
    ranks: dict[str, int] = {n: 0 for n in scores}
    order = {n: i for i, n in enumerate(scores)}

    def next_rank(n: str) -> int | None:
        cur = ranks[n]
        if cur >= cap[n]:
            return None
        nxt = next((c for c in choices if c > cur), None)
        return min(nxt, cap[n]) if nxt is not None else None

    prio = {n: scores[n] ** temper for n in scores}
    heap: list[tuple[float, int, str, int]] = []
    for n in scores:
        r = next_rank(n)
        if r:
            heapq.heappush(heap, (-prio[n] / r, order[n], n, r))
    used = 0
    while heap:
        _, _, n, r = heapq.heappop(heap)
        cost = (r - ranks[n]) * width[n]
        if used + cost > budget:
            continue  # a larger step never fits either; the module keeps its rank
        ranks[n] = r
        used += cost
        r2 = next_rank(n)
        if r2:
            heapq.heappush(heap, (-prio[n] / r2, order[n], n, r2))
    chosen = {n: r for n, r in ranks.items() if r > 0}
    skipped = [n for n in scores if n not in chosen]
    if skipped:
        notes.append(f"{len(skipped)} damaged modules left out by the budget (lowest scores)")
    plan = AdapterPlan(ranks=chosen, base_rank=rank, alpha_ratio=alpha / rank, dropout=dropout, init=init,
                       budget=budget, parameters=used, scores={n: scores[n] for n in scores}, notes=notes)
    log.info("auto placement: %s", plan.summary())
    return plan


def recommend(diag: dict[str, Any], degraded: nn.Module, cfg) -> AdapterPlan:
    """The placement a diagnosis recommends (``cfg``: its DiagnoseConfig's rank, alpha, budget and
    temper), also recorded in ``diag["recommendation"]`` for the diagnosis files."""
    plan = auto_placement(diag, degraded, rank=cfg.rank, budget=cfg.budget, alpha=cfg.alpha, temper=cfg.temper)
    diag["recommendation"] = {**plan.to_dict(), "summary": plan.summary()}
    return plan


def auto_plan(reference: nn.Module, degraded: nn.Module, tokenizer: Any, heldout_ids: torch.Tensor | None,
              out_dir: str | Path, rank: int = 16, alpha: float | None = None, budget: int | None = None,
              dropout: float = 0.0, init: str = "default", write: bool = True, **diagnose_kw: Any) -> AdapterPlan:
    """What ``recover --placement auto`` runs: reuse ``out_dir/plan.json`` when present (a resumed
    run keeps its adapter layout), else diagnose, write the diagnosis into ``out_dir`` and plan.

    ``write=False`` (non-zero ranks under torchrun) computes the same plan without writing.
    """
    from .diagnose import DiagnoseConfig, diagnose, write_diagnosis

    out = Path(out_dir)
    saved = out / "plan.json"
    if saved.exists():
        plan = AdapterPlan.load(saved)
        if plan.base_rank != rank:
            raise RecoverLoraError(f"{saved} was planned at rank {plan.base_rank}, not {rank}; "
                                   "use a new output folder or delete it")
        return plan
    cfg = DiagnoseConfig(rank=rank, alpha=2.0 * rank if alpha is None else alpha, budget=budget, **diagnose_kw)
    partial = out / ".diagnosis.partial.json" if write else None  # an interruption keeps the measured layers
    if partial is not None:
        out.mkdir(parents=True, exist_ok=True)
    diag = diagnose(reference, degraded, tokenizer, cfg, heldout_ids=heldout_ids, partial=partial)
    plan = recommend(diag, degraded, cfg)
    plan.dropout, plan.init = dropout, init
    diag["recommendation"].update(dropout=dropout, init=init)
    if write:
        write_diagnosis(diag, out)
        partial.unlink(missing_ok=True)
    return plan


def diagnose_cli(args) -> int:
    """``recover-lora diagnose`` (``commands.DiagnoseCmd``)."""
    import copy

    from .diagnose import diagnose, kl_str, write_diagnosis
    from .load import load_pair
    from .utils import resolve_device

    cfg = copy.copy(args.diagnose)
    # seq_len 0: 128 on a GPU, 64 on a CPU (the diagnosis runs about three forwards a layer)
    cfg.seq_len = cfg.seq_len or (128 if resolve_device(args.load.device).type == "cuda" else 64)
    cfg.validate()
    lcfg = args.load
    print(f"loading {args.reference} and {args.degraded} ...", flush=True)
    pair = load_pair(args.reference, args.degraded, lcfg)
    partial = Path(args.out_dir) / ".diagnosis.partial.json"  # Ctrl-C keeps the layers measured so far
    partial.parent.mkdir(parents=True, exist_ok=True)
    diag = diagnose(pair.reference, pair.degraded, pair.tokenizer, cfg, progress=True, partial=partial)
    diag["reference"], diag["degraded"] = str(args.reference), str(args.degraded)
    recommend(diag, pair.degraded, cfg)
    paths = write_diagnosis(diag, args.out_dir)
    partial.unlink(missing_ok=True)
    for n, e in diag["nonfinite"].items():
        print(f"non-finite weights: {n}: {e['nan']} NaN, {e['inf']} Inf")
    f = diag["functional"]
    if f:
        print(f"held-out KL {kl_str(f['base'])}; layers by damage: {diag['ranking'][:10]}")
    print(f"recommendation: {diag['recommendation']['summary']}")
    print(f"wrote {paths['markdown']}, {paths['json']}, {paths['png']}, {paths['plan']}")
    return 0
