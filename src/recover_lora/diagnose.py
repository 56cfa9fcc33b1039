"""Damage diagnosis: where are the degraded weights wrong, and where does it hurt?

For every decoder layer and linear module, :func:`diagnose` reports

- **weight damage**: relative L2 ``||W_deg - W_ref|| / ||W_ref||``, max ``|W_deg - W_ref|``, and the
  count of NaN / Inf entries of the degraded weight (non-finite entries are listed for *every*
  tensor of the model, by full name, not only for linear weights);
- **functional damage**: the held-out KL(reference || degraded) with only that layer's weights
  restored to the reference (swapped in place, measured, swapped back), and optionally with only
  its attention or only its MLP restored. The KL reduction a restoration buys says how much of
  the total damage that layer (or block) is responsible for.

The placement it recommends is :func:`recover_lora.placement.recommend`'s (this module only measures).
:func:`write_diagnosis` writes ``diagnosis.json``, ``diagnosis.md`` and ``diagnosis.png`` (heatmap of
relative L2, layers x module types, and a bar chart of per-layer KL reduction).

A degraded model with NaN/Inf weights gives NaN logits: its KL is reported as non-finite (JSON
``null`` with ``"finite": false``; "nan" in the table) and a layer whose restoration makes the
output finite again ranks first.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .config import DistillConfig, SynthConfig
from .modules import decoder_layers_prefix, select_modules
from .kl import KLMeter
from .synth import heldout
from .utils import RecoverLoraError, atomic_write_bytes, atomic_write_json, log, save_figure
from .config import DiagnoseConfig  # noqa: F401 - re-exported

DIAGNOSIS_FORMAT = "recover-lora/diagnosis"
DIAGNOSIS_VERSION = 1
HELDOUT_SEED = 2_000_003  # synthetic diagnosis sequences never share a seed with training data


# ----------------------------------------------------------------------------------------------
# Weight damage
# ----------------------------------------------------------------------------------------------


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


@torch.no_grad()
def _tensor_damage(ref: torch.Tensor, deg: torch.Tensor) -> dict[str, Any]:
    r = ref.detach().float()
    d = deg.detach().float()
    n_nan = int(torch.isnan(d).sum().item())
    n_inf = int(torch.isinf(d).sum().item())
    finite = torch.isfinite(d)
    diff = torch.where(finite, d - r, torch.zeros_like(d))
    rn = torch.linalg.vector_norm(r).item()
    dn = torch.linalg.vector_norm(diff).item()
    out: dict[str, Any] = {
        "numel": d.numel(),
        # over the finite entries when some are NaN/Inf (the count says how many are not)
        "rel_l2": (dn / rn) if rn > 0 else (0.0 if dn == 0 else None),
        "max_abs": torch.linalg.vector_norm(diff, ord=math.inf).item() if d.numel() else 0.0,
        "nan": n_nan, "inf": n_inf, "ref_norm": rn,
    }
    out["damaged"] = bool(dn > 0 or n_nan or n_inf)
    return out


def _layer_parts(name: str, prefix: str | None) -> tuple[int | None, str]:
    """``model.layers.3.self_attn.q_proj.weight`` -> (3, ``self_attn.q_proj.weight``)."""
    if prefix is not None and name.startswith(prefix + "."):
        head, _, rest = name[len(prefix) + 1:].partition(".")
        if head.isdigit():
            return int(head), rest
    return None, name


def _group_of(rel: str) -> str:
    """The block a layer-relative name belongs to: ``self_attn``, ``mlp``, or ``other`` (norms)."""
    head = rel.split(".", 1)[0]
    if "." not in rel or "norm" in head:
        return "other"
    return head if any(k in head for k in ("attn", "attention", "mlp", "feed_forward", "ffn", "moe")) else "other"


def weight_damage(reference: nn.Module, degraded: nn.Module) -> dict[str, Any]:
    """Per-tensor damage of every parameter, plus the linear modules of the decoder layers."""
    ref_params = dict(reference.named_parameters())
    prefix = decoder_layers_prefix(degraded)
    tensors: dict[str, dict[str, Any]] = {}
    for name, p in degraded.named_parameters():
        if name not in ref_params:
            raise RecoverLoraError(f"degraded tensor {name} has no counterpart in the reference")
        if tuple(ref_params[name].shape) != tuple(p.shape):
            raise RecoverLoraError(f"{name}: reference {tuple(ref_params[name].shape)}, degraded {tuple(p.shape)}")
        tensors[name] = _tensor_damage(ref_params[name], p)
    modules: dict[str, dict[str, Any]] = {}
    for mname, mod in select_modules(degraded, ["all-linear"]):
        if not isinstance(mod, nn.Linear):
            continue
        e = dict(tensors[mname + ".weight"])
        layer, rel = _layer_parts(mname, prefix)
        e.update(layer=layer, type=mname.rsplit(".", 1)[-1], group=_group_of(rel),
                 in_features=mod.in_features, out_features=mod.out_features)
        modules[mname] = e
    nonfinite = {n: {"nan": e["nan"], "inf": e["inf"]} for n, e in tensors.items() if e["nan"] or e["inf"]}
    return {"tensors": tensors, "modules": modules, "nonfinite": nonfinite, "layers_prefix": prefix}


# ----------------------------------------------------------------------------------------------
# Functional damage
# ----------------------------------------------------------------------------------------------


def _kl_entry(m: dict[str, float]) -> dict[str, Any]:
    """A KLMeter reading as the diagnosis records it: a non-finite KL as None with ``finite`` false."""
    return {"kl": _finite_or_none(m["kl"]), "finite": math.isfinite(m["kl"]), "top1": m["top1"]}


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="diagnose: restore each layer", unit="pass", disable=not enabled,
                dynamic_ncols=True)


@torch.no_grad()
def restored(degraded: nn.Module, reference: nn.Module, names: list[str], fn):
    """Run ``fn()`` with the named parameters of ``degraded`` set to the reference's, then undo."""
    dp = dict(degraded.named_parameters())
    rp = dict(reference.named_parameters())
    saved = {n: dp[n].detach().clone() for n in names}
    try:
        for n in names:
            dp[n].copy_(rp[n].to(dp[n].dtype))
        return fn()
    finally:
        for n in names:
            dp[n].copy_(saved[n])


def _reduction(base: dict[str, Any], restored: dict[str, Any]) -> float:
    """KL removed by a restoration; +inf when it turns a non-finite output finite."""
    if not base["finite"]:
        return math.inf if restored["finite"] else 0.0
    if not restored["finite"]:
        return -math.inf
    return base["kl"] - restored["kl"]


def _num(x: float) -> float | str:
    """JSON-safe: infinities as strings."""
    return x if math.isfinite(x) else ("inf" if x > 0 else "-inf")


# ----------------------------------------------------------------------------------------------
# The diagnosis
# ----------------------------------------------------------------------------------------------


def _layer_table(wd: dict[str, Any], n_layers: int) -> tuple[dict, list[str], list[dict[str, Any]]]:
    """Per layer: its changed tensors by group (attention / MLP / ...) and its weight damage; the
    tensors outside the decoder layers."""
    prefix = wd["layers_prefix"]
    layer_params: dict[int, dict[str, list[str]]] = {i: {} for i in range(n_layers)}
    outside: list[str] = []
    for name in wd["tensors"]:
        layer, rel = _layer_parts(name, prefix)
        if layer is None:
            outside.append(name)
        else:
            layer_params[layer].setdefault(_group_of(rel), []).append(name)

    def damaged(names: list[str]) -> bool:
        return any(wd["tensors"][n]["damaged"] for n in names)

    layers: list[dict[str, Any]] = []
    for i in range(n_layers):
        mods = {n: e for n, e in wd["modules"].items() if e["layer"] == i}
        all_names = [n for ns in layer_params[i].values() for n in ns]
        # layer rel L2 over its linear weights: sqrt(sum ||dW||^2 / sum ||W||^2) (finite entries)
        sq = sum(((e["rel_l2"] or 0.0) * e["ref_norm"]) ** 2 for e in mods.values())
        ws = sum(e["ref_norm"] ** 2 for e in mods.values())
        layers.append({
            "layer": i, "damaged": damaged(all_names),
            "rel_l2": math.sqrt(sq / ws) if ws > 0 else 0.0,
            "max_abs": max((wd["tensors"][n]["max_abs"] for n in all_names), default=0.0),
            "nan": sum(wd["tensors"][n]["nan"] for n in all_names),
            "inf": sum(wd["tensors"][n]["inf"] for n in all_names),
            "groups": {g: {"damaged": damaged(ns)} for g, ns in layer_params[i].items()},
        })
    return layer_params, outside, layers


def _partial_key(ids: torch.Tensor, cfg: DiagnoseConfig, base: dict[str, Any]) -> dict[str, Any]:
    """What a kept partial diagnosis must match to be reused: the same tokens, measurement settings
    and degraded model (its base KL, to the bit: another damage or model reads differently)."""
    import hashlib

    return {"ids": hashlib.sha256(ids.cpu().numpy().tobytes()).hexdigest()[:16], "shape": list(ids.shape),
            "batch_size": cfg.batch_size, "chunk_tokens": cfg.chunk_tokens, "per_group": cfg.per_group,
            "base": base}


def _functional(reference: nn.Module, degraded: nn.Module, ids: torch.Tensor, cfg: DiagnoseConfig,
                layer_params: dict, outside: list[str], outside_damaged: list[str], layers: list[dict[str, Any]],
                progress: bool, partial: Path | None = None) -> dict[str, Any]:
    """The held-out KL with each damaged layer (and block) restored in turn; fills ``layers``.

    ``partial``: a file that keeps each measured layer as it finishes, so that an interrupted
    diagnosis continues at the next layer (the caller deletes it once the diagnosis is written)."""
    meter = KLMeter(reference, ids, cfg.batch_size, DistillConfig(chunk_tokens=cfg.chunk_tokens), cache=True)

    def kl(model, start=None):
        return _kl_entry(meter(model, start))

    meter.keep_inputs()  # restoring layer i changes nothing before it: later passes start at i
    base = kl(degraded)
    key = _partial_key(ids, cfg, base)
    kept: dict[str, Any] = {}  # layer -> its measurements, kept in ``partial`` as each finishes
    if partial is not None and partial.exists():
        try:
            saved = json.loads(partial.read_text())
        except (OSError, ValueError):
            saved = {}
        if saved.get("key") == key:
            kept = dict(saved.get("layers", {}))
            log.info("diagnosis: resuming after %d measured layers (%s)", len(kept), partial)
        else:
            log.info("diagnosis: %s was made for other inputs; measuring every layer again", partial)
    resumed = len(kept)
    todo = sum(1 + sum(G["damaged"] for G in L["groups"].values()) * cfg.per_group for L in layers if L["damaged"])
    bar = _progress(todo, progress)
    functional = {"sequences": len(ids), "seq_len": ids.shape[1], "base": base}
    for L in layers:
        i = L["layer"]
        names = [n for ns in layer_params[i].values() for n in ns]
        if not L["damaged"]:
            L["restore"] = dict(base)  # nothing to restore: the same model
            L["kl_reduction"] = 0.0
            continue
        if str(i) in kept:  # measured before the interruption, with the same inputs
            K = kept[str(i)]
            L["restore"], L["kl_reduction"] = K["restore"], K["kl_reduction"]
            for g, G in K["groups"].items():
                L["groups"][g].update(G)
            bar.update(1 + sum(G["damaged"] for G in L["groups"].values()) * cfg.per_group)
            continue
        L["restore"] = restored(degraded, reference, names, lambda: kl(degraded, start=i))
        L["kl_reduction"] = _reduction(base, L["restore"])
        bar.update(1)
        dgroups = [g for g, G in L["groups"].items() if G["damaged"]]
        for g in dgroups:
            G = L["groups"][g]
            if len(dgroups) == 1:  # restoring the one damaged block = restoring the layer
                G["restore"], G["kl_reduction"] = L["restore"], L["kl_reduction"]
            elif cfg.per_group:
                G["restore"] = restored(degraded, reference, layer_params[i][g], lambda: kl(degraded, start=i))
                G["kl_reduction"] = _reduction(base, G["restore"])
            if cfg.per_group:
                bar.update(1)
        if partial is not None:
            kept[str(i)] = {"restore": L["restore"], "kl_reduction": L["kl_reduction"],
                            "groups": {g: {k: G[k] for k in ("restore", "kl_reduction") if k in G}
                                       for g, G in L["groups"].items()}}
            # plain json.dumps, not atomic_write_json (which writes infinities as null): a NaN weight
            # restored gives an infinite reduction, and floats and Infinity round-trip exactly, so a
            # resumed diagnosis equals an uninterrupted one
            atomic_write_bytes(partial, json.dumps({"key": key, "layers": kept}).encode())
    bar.close()
    if outside_damaged:
        r = restored(degraded, reference, outside, lambda: kl(degraded))
        functional["outside_layers"] = {"tensors": outside_damaged, "restore": r,
                                        "kl_reduction": _num(_reduction(base, r))}
    functional["forward_passes"] = meter.calls  # this process's: a resumed diagnosis counts its own
    if resumed:
        functional["resumed_layers"] = resumed  # measured before an interruption, kept
    return functional


def diagnose(reference: PreTrainedModel, degraded: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None,
             cfg: DiagnoseConfig | None = None, heldout_ids: torch.Tensor | None = None,
             progress: bool = False, partial: str | Path | None = None) -> dict[str, Any]:
    """Weight and functional damage per layer and module (measurements only: the placement they
    recommend is :func:`recover_lora.placement.recommend`'s).

    ``degraded`` is modified during the functional measurements and restored exactly afterwards.
    ``heldout_ids`` (e.g. recover's held-out synthetic shard): the first ``cfg.sequences`` rows are
    used; None generates them from the reference (needs ``tokenizer``). ``partial``: a file that
    keeps the layers measured so far, so that an interrupted diagnosis resumes (delete it after).
    """
    cfg = cfg or DiagnoseConfig()
    cfg.validate()
    t0 = time.perf_counter()
    wd = weight_damage(reference, degraded)
    prefix = wd["layers_prefix"]
    n_layers = len(degraded.get_submodule(prefix)) if prefix else 0
    layer_params, outside, layers = _layer_table(wd, n_layers)
    outside_damaged = [n for n in outside if wd["tensors"][n]["damaged"]]

    functional: dict[str, Any] | None = None
    if cfg.functional:
        if heldout_ids is None:
            if tokenizer is None:
                raise RecoverLoraError("diagnose needs a tokenizer (or heldout_ids) for the functional measurements")
            heldout_ids = heldout(reference, tokenizer, SynthConfig(seq_len=cfg.seq_len, seed=cfg.seed), cfg.sequences,
                                  offset=HELDOUT_SEED)
        was = (reference.training, degraded.training)
        reference.eval()
        degraded.eval()
        try:
            functional = _functional(reference, degraded, heldout_ids[:cfg.sequences].long(), cfg, layer_params,
                                     outside, outside_damaged, layers, progress,
                                     Path(partial) if partial is not None else None)
        finally:
            reference.train(was[0])
            degraded.train(was[1])

    # ranking: non-finite weights first, then KL reduction, then weight damage
    def key(L: dict[str, Any]) -> tuple:
        red = L.get("kl_reduction", 0.0)
        return (-(L["nan"] + L["inf"] > 0), -(red if not math.isnan(red) else 0.0), -L["rel_l2"], L["layer"])

    ranking = [L["layer"] for L in sorted(layers, key=key) if L["damaged"]]
    base_kl = functional["base"]["kl"] if functional else None
    for L in layers:
        red = L.get("kl_reduction")
        if red is not None:
            L["kl_reduction_share"] = (red / base_kl) if base_kl and math.isfinite(red) else None
            L["kl_reduction"] = _num(red)
            for G in L["groups"].values():
                if "kl_reduction" in G:
                    G["kl_reduction"] = _num(float(G["kl_reduction"]))

    diag: dict[str, Any] = {
        "format": DIAGNOSIS_FORMAT, "version": DIAGNOSIS_VERSION,
        "model_type": getattr(degraded.config, "model_type", None), "num_layers": n_layers,
        "config": asdict(cfg),
        "nonfinite": wd["nonfinite"],
        "layers": layers,
        "ranking": ranking,
        "modules": wd["modules"],
        "other_tensors": {n: wd["tensors"][n] for n in outside_damaged},
        "functional": functional,
    }
    diag["seconds"] = round(time.perf_counter() - t0, 2)
    log.info("diagnosis: %d damaged layers, %d tensors with NaN/Inf, base KL %s", len(ranking),
             len(wd["nonfinite"]), base_kl)  # the plan's summary: logged once, by auto_placement
    return diag


# ----------------------------------------------------------------------------------------------
# Output: JSON, Markdown, PNG
# ----------------------------------------------------------------------------------------------


def _fmt(x: Any, spec: str = ".4f", none: str = "nan") -> str:
    if x is None:
        return none
    if isinstance(x, str):
        return x
    if isinstance(x, float) and not math.isfinite(x):
        return "inf" if x > 0 else ("-inf" if x < 0 else "nan")
    return format(x, spec)


def kl_str(m: dict[str, Any] | None) -> str:
    if m is None:
        return "-"
    return _fmt(m["kl"]) if m["finite"] else "nan (non-finite output)"


def module_types(diag: dict[str, Any]) -> list[str]:
    seen: list[str] = []
    for e in diag["modules"].values():
        if e["type"] not in seen:
            seen.append(e["type"])
    return seen


def to_markdown(diag: dict[str, Any]) -> str:
    types = module_types(diag)
    lines = [f"# Damage diagnosis ({diag['model_type']}, {diag['num_layers']} layers)", ""]
    f = diag["functional"]
    if f:
        lines += [f"Held-out KL(reference || degraded) on {f['sequences']} x {f['seq_len']} synthetic tokens: "
                  f"**{kl_str(f['base'])}**, top-1 agreement {100 * f['base']['top1']:.1f}%.", ""]
    if diag["nonfinite"]:
        lines += ["## Non-finite weights", "", "| tensor | NaN | Inf |", "|---|---:|---:|"]
        lines += [f"| `{n}` | {e['nan']} | {e['inf']} |" for n, e in diag["nonfinite"].items()]
        lines += ["", "LoRA adds to W and cannot cancel NaN/Inf: zero or restore these entries before repair.", ""]
    lines += ["## Per layer", "",
              "| layer | rel L2 | max abs | NaN | Inf | KL, layer restored | KL reduction | share | "
              + " | ".join(f"KL red., {g} restored" for g in _groups(diag)) + " |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * len(_groups(diag))]
    for L in diag["layers"]:
        gcols = [_fmt(L["groups"].get(g, {}).get("kl_reduction")) if g in L["groups"] and "kl_reduction" in
                 L["groups"][g] else "-" for g in _groups(diag)]
        lines.append(f"| {L['layer']} | {_fmt(L['rel_l2'])} | {_fmt(L['max_abs'], '.4g')} | {L['nan']} | {L['inf']} | "
                     f"{kl_str(L.get('restore')) if L['damaged'] else '-'} | {_fmt(L.get('kl_reduction'))} | "
                     f"{_fmt(L.get('kl_reduction_share'), '.1%', '-')} | " + " | ".join(gcols) + " |")
    lines += ["", "## Relative L2 per module", "", "| layer | " + " | ".join(types) + " |",
              "|---:|" + "---:|" * len(types)]
    grid = _grid(diag, types)
    for i, row in enumerate(grid):
        lines.append(f"| {i} | " + " | ".join("NaN/Inf" if v is None else _fmt(v) for v in row) + " |")
    if diag["other_tensors"]:
        lines += ["", "Damaged tensors outside the decoder layers: "
                  + ", ".join(f"`{n}` (rel L2 {_fmt(e['rel_l2'])})" for n, e in diag["other_tensors"].items())]
        if f and f.get("outside_layers"):
            lines.append(f"(restoring them: KL {kl_str(f['outside_layers']['restore'])}). "
                         "Adapters do not cover embeddings / head; consider restoring them from the reference.")
    lines += ["", f"Layers ranked by damage: {', '.join(map(str, diag['ranking'])) or 'none damaged'}.", ""]
    rec = diag.get("recommendation")  # placement.recommend adds it
    if rec:
        lines += ["## Recommended placement", "", rec["summary"], ""]
    if rec and rec["ranks"]:
        lines += ["| module | rank | score |", "|---|---:|---:|"]
        lines += [f"| `{n}` | {r} | {_fmt(rec['scores'].get(n), '.4g')} |" for n, r in rec["ranks"].items()]
    return "\n".join(lines) + "\n"


def _groups(diag: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for L in diag["layers"]:
        for g in L["groups"]:
            if g != "other" and g not in out:
                out.append(g)
    return out


def _grid(diag: dict[str, Any], types: list[str]) -> list[list[float | None]]:
    """rel L2 per (layer, module type); None = NaN/Inf in the weight, 0 where absent."""
    grid = [[0.0] * len(types) for _ in range(diag["num_layers"])]
    for e in diag["modules"].values():
        if e["layer"] is None:
            continue
        grid[e["layer"]][types.index(e["type"])] = None if (e["nan"] or e["inf"]) else (e["rel_l2"] or 0.0)
    return grid


def plot_diagnosis(diag: dict[str, Any], path: str | Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    types = module_types(diag)
    grid = _grid(diag, types)
    n = max(1, diag["num_layers"])
    arr = np.array([[np.nan if v is None else v for v in row] for row in grid], dtype=float).reshape(n, -1)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, max(3.5, 0.25 * n + 1.5)),
                                   gridspec_kw={"width_ratios": [max(1, len(types)), 4]})
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="red")
    im = ax1.imshow(np.ma.masked_invalid(arr), aspect="auto", cmap=cmap, interpolation="nearest", vmin=0.0)
    ax1.set_xticks(range(len(types)), types, rotation=45, ha="right")
    ax1.set_yticks(range(n))
    ax1.set_ylabel("layer")
    ax1.set_title("relative L2 of dW (red: NaN/Inf)")
    fig.colorbar(im, ax=ax1, fraction=0.046)
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            if v is None:
                ax1.text(j, i, "NaN", ha="center", va="center", color="white", fontsize=7)
    f = diag["functional"]
    if f:
        reds, colors = [], []
        finite = [L["kl_reduction"] for L in diag["layers"] if isinstance(L.get("kl_reduction"), float)]
        top = max([abs(x) for x in finite if x] + [0.0]) or 1.0
        for i, L in enumerate(diag["layers"]):
            r = L.get("kl_reduction", 0.0)
            if isinstance(r, str):  # inf: restoring this layer makes the output finite again
                reds.append(top * 1.1 if r == "inf" else -top * 1.1)
                colors.append("red")
                ax2.text(0, i, " output finite again" if r == "inf" else " output non-finite", va="center",
                         fontsize=8)
            else:
                reds.append(r)
                colors.append("C0")
        ax2.barh(range(n), reds, color=colors)
        for i, L in enumerate(diag["layers"]):  # the bar's share of the whole held-out KL
            sh = L.get("kl_reduction_share")
            if isinstance(sh, float) and math.isfinite(sh) and isinstance(L.get("kl_reduction"), float):
                ax2.text(L["kl_reduction"], i, f" {sh:.0%}", va="center", fontsize=7)
        ax2.set_yticks(range(n))
        ax2.set_ylim(n - 0.5, -0.5)
        ax2.set_xlabel("KL removed by restoring this layer alone (nats/token)")
        ax2.set_title(f"restoring one layer: KL removed (labels: % of the held-out KL {kl_str(f['base'])})",
                      fontsize=9)
        ax2.grid(True, axis="x", alpha=0.3)
    else:
        ax2.axis("off")
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def write_diagnosis(diag: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """``diagnosis.json``, ``diagnosis.md``, ``diagnosis.png`` and (with a recommendation)
    ``plan.json`` in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "diagnosis.json", "markdown": out / "diagnosis.md", "png": out / "diagnosis.png"}
    atomic_write_json(paths["json"], diag)
    if diag.get("recommendation"):
        paths["plan"] = out / "plan.json"
        atomic_write_json(paths["plan"], diag["recommendation"])
    atomic_write_bytes(paths["markdown"], to_markdown(diag).encode())
    plot_diagnosis(diag, paths["png"])
    return paths
