"""The recovery report: how much of the accuracy lost to damage an adapter brings back.

For every task evaluated on all three models (reference, degraded, recovered) and for their
unweighted average:

- the three accuracies (``acc_norm`` where the task defines it, else ``acc``; see ``ReportConfig.metric``),
- the drop (reference - degraded) and the points recovered (recovered - degraded), in points,
- the share of the gap closed, (recovered - degraded) / (reference - degraded),
- 95% confidence intervals for each, from a seeded paired bootstrap over items: one resample of
  item indices per replicate is applied to all three models (they answer the same items), so the
  correlation between models is kept. The average resamples each task independently.

Written as ``report.md``, ``report.json`` and ``report.png`` (matplotlib, Agg backend).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from .utils import RecoverLoraError, atomic_write_bytes, atomic_write_json, save_figure
from .config import ReportConfig  # noqa: F401 - re-exported

MODELS = ("reference", "degraded", "recovered")


def task_results(res: Any) -> dict:
    """Accept evaluate()'s dict, an ``eval --out-file`` JSON (``{"results": ...}``) or a path to one."""
    if isinstance(res, (str, Path)):
        try:
            res = json.loads(Path(res).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise RecoverLoraError(f"cannot read results {res}: {e}") from None
    if not isinstance(res, dict):
        raise RecoverLoraError(f"results must be a dict, got {type(res).__name__}")
    if "results" in res and isinstance(res["results"], dict):
        res = res["results"]
    return {k: v for k, v in res.items() if isinstance(v, dict) and "acc" in v}


def _metric_for(task: str, entries: list[dict], metric: str) -> str:
    if metric == "auto":
        return "acc_norm" if all("acc_norm" in e for e in entries) else "acc"
    if not all(metric in e for e in entries):
        raise RecoverLoraError(f"{task}: metric {metric} missing from some results")
    return metric


def item_array(items: list | str | np.ndarray) -> np.ndarray:
    """Per-item scores as floats, from a list or from the compact "0110..." string of 0/1 scores
    that the study stores (a tenth of the size of a JSON list)."""
    if isinstance(items, str):
        return (np.frombuffer(items.encode(), dtype=np.uint8) - ord("0")).astype(np.float64)
    return np.asarray(items, dtype=np.float64)


def _items(entry: dict, metric: str) -> np.ndarray | None:
    items = entry.get("items", {}).get(metric)
    return None if items is None else item_array(items)


def gap_closed(ref: float, deg: float, rec: float, eps: float = 1e-12) -> float | None:
    """(rec - deg) / (ref - deg); None when there is no gap."""
    gap = ref - deg
    return None if abs(gap) < eps else (rec - deg) / gap


def _stats(ref, deg, rec) -> dict[str, np.ndarray]:
    """Statistics (vectorised over bootstrap replicates) from accuracies in [0, 1]."""
    ref, deg, rec = (np.asarray(x, dtype=np.float64) for x in (ref, deg, rec))
    gap = ref - deg
    with np.errstate(divide="ignore", invalid="ignore"):
        closed = np.where(np.abs(gap) < 1e-12, np.nan, (rec - deg) / np.where(gap == 0, 1, gap))
    # the distance to the reference closed, in points: a repair moves a task back toward the
    # reference whichever side of it the damage left the task (a damaged model can score above it)
    dist = 100 * (np.abs(gap) - np.abs(ref - rec))
    return {"reference": 100 * ref, "degraded": 100 * deg, "recovered": 100 * rec,
            "drop": 100 * gap, "recovered_points": 100 * (rec - deg), "gap_closed": closed,
            "distance_closed": dist}


def _interval(samples: np.ndarray, ci: float) -> list[float] | None:
    s = samples[np.isfinite(samples)]
    if s.size < max(10, samples.size // 2):  # mostly undefined (no gap in most replicates)
        return None
    lo, hi = np.percentile(s, [100 * (1 - ci) / 2, 100 * (1 + ci) / 2])
    return [float(lo), float(hi)]


def _boot_means(rng: np.random.Generator, arrays: list[np.ndarray], n_boot: int) -> list[np.ndarray]:
    """Paired bootstrap: the same resampled item indices for every array; returns means per replicate."""
    n = arrays[0].size
    out = [np.empty(n_boot) for _ in arrays]
    chunk = max(1, min(n_boot, 4_000_000 // max(n, 1)))
    for s in range(0, n_boot, chunk):
        e = min(n_boot, s + chunk)
        idx = rng.integers(0, n, size=(e - s, n))
        for a, o in zip(arrays, out):
            o[s:e] = a[idx].mean(axis=1)
    return out


def compute_report(reference_results, degraded_results, recovered_results, cfg: ReportConfig | None = None) -> dict:
    """The numbers of the report (no files written)."""
    cfg = cfg or ReportConfig()
    runs = [task_results(r) for r in (reference_results, degraded_results, recovered_results)]
    tasks = [t for t in runs[0] if t in runs[1] and t in runs[2]]
    if not tasks:
        raise RecoverLoraError("no task was evaluated on all three models "
                               f"(reference: {sorted(runs[0])}, degraded: {sorted(runs[1])}, recovered: {sorted(runs[2])})")
    rng = np.random.default_rng(cfg.seed)
    rows: dict[str, dict] = {}
    boot_acc: dict[str, list[np.ndarray]] = {}
    for t in tasks:
        entries = [r[t] for r in runs]
        metric = _metric_for(t, entries, cfg.metric)
        accs = [float(e[metric]) for e in entries]
        point = {k: float(v) for k, v in _stats(*accs).items() if not (k == "gap_closed" and np.isnan(v))}
        point.setdefault("gap_closed", None)
        row = {"metric": metric, "n": int(entries[0].get("n", 0)), **point, "ci": None}
        items = [_items(e, metric) for e in entries]
        if all(i is not None for i in items) and len({i.size for i in items}) == 1 and items[0].size > 0:
            means = _boot_means(rng, items, cfg.n_boot)
            boot_acc[t] = means
            row["ci"] = {k: _interval(v, cfg.ci) for k, v in _stats(*means).items()}
        elif all(i is not None for i in items):
            raise RecoverLoraError(f"{t}: the three results cover different numbers of items "
                                   f"({[i.size for i in items]}); evaluate them with the same --eval.limit")
        rows[t] = row
    # unweighted average over tasks
    avg_acc = [float(np.mean([rows[t][m] for t in tasks])) / 100 for m in MODELS]
    avg = {"metric": "mean", "n": int(sum(rows[t]["n"] for t in tasks)),
           **{k: (None if (k == "gap_closed" and np.isnan(v)) else float(v)) for k, v in _stats(*avg_acc).items()},
           "ci": None}
    if len(boot_acc) == len(tasks):
        means = [np.mean([boot_acc[t][i] for t in tasks], axis=0) for i in range(3)]
        avg["ci"] = {k: _interval(v, cfg.ci) for k, v in _stats(*means).items()}
    # A task's gap is resolved when the CI of reference - degraded excludes zero: only there does
    # the share of it closed mean anything. Their average is the headline; the others are named.
    resolved = [t for t in tasks if (rows[t]["ci"] or {}).get("drop") and (rows[t]["ci"]["drop"][0] > 0
                                                                           or rows[t]["ci"]["drop"][1] < 0)]
    for t in tasks:
        rows[t]["resolved"] = t in resolved
    res_avg = None
    if resolved:
        # accuracies averaged over the resolved tasks; the gap closed is the share of the summed
        # distance to the reference closed (sum |ref - deg| - |ref - rec| over sum |ref - deg|): the
        # usual (rec - deg) / (ref - deg) when every gap has the sign of a drop, and still right when
        # the damage lifted a task above the reference (BoolQ under noise), where averaging
        # accuracies would let that task cancel the others
        acc = [float(np.mean([rows[t][m] for t in resolved])) / 100 for m in MODELS]
        res_avg = {"metric": "mean", "tasks": resolved, "n": int(sum(rows[t]["n"] for t in resolved)),
                   **{k: float(v) for k, v in _stats(*acc).items() if k not in ("gap_closed", "distance_closed")},
                   "ci": None}

        def closed(r, d, c):  # lists over the resolved tasks of accuracies (or bootstrap arrays)
            gaps = sum(np.abs(np.asarray(a) - np.asarray(b)) for a, b in zip(r, d))
            left = sum(np.abs(np.asarray(a) - np.asarray(b)) for a, b in zip(r, c))
            with np.errstate(divide="ignore", invalid="ignore"):
                return np.where(gaps < 1e-12, np.nan, (gaps - left) / np.where(gaps == 0, 1, gaps)), \
                    100 * (gaps - left) / len(r)

        g, pts = closed(*[[rows[t][m] / 100 for t in resolved] for m in MODELS])
        res_avg["gap_closed"] = None if np.isnan(g) else float(g)
        res_avg["points_closed"] = float(pts)
        means = [np.mean([boot_acc[t][i] for t in resolved], axis=0) for i in range(3)]
        res_avg["ci"] = {k: _interval(v, cfg.ci) for k, v in _stats(*means).items()
                         if k not in ("gap_closed", "distance_closed")}
        gb, pb = closed(*[[boot_acc[t][i] for t in resolved] for i in range(3)])
        res_avg["ci"]["gap_closed"] = _interval(gb, cfg.ci)
        res_avg["ci"]["points_closed"] = _interval(pb, cfg.ci)
    return {"config": asdict(cfg), "tasks": rows, "average": avg, "task_order": tasks,
            "resolved_average": res_avg, "unresolved": [t for t in tasks if t not in resolved]}


def pred_items(entry: dict, metric: str) -> np.ndarray | None:
    """A task's per-item choices under its metric (``pred_norm`` for acc_norm), or None if not kept."""
    items = entry.get("items", {}).get("pred_norm" if metric == "acc_norm" else "pred")
    return None if items is None else item_array(items)


def compute_measures(reference_results, model_results, cfg: ReportConfig | None = None) -> dict:
    """What a few hundred items resolve where accuracy cannot: per task, the share of items on which
    the model picks the reference's choice (under the task's metric: ``pred_norm`` for acc_norm)
    and the mean answer-token KL to the reference (``evaluate(reference=...)``); their unweighted
    means over tasks; 95% bootstrap CIs over items (tasks resampled independently)."""
    cfg = cfg or ReportConfig()
    ref, mod = task_results(reference_results), task_results(model_results)
    tasks = [t for t in ref if t in mod]
    rng = np.random.default_rng(cfg.seed)
    rows, boots = {}, {"agreement": [], "answer_kl": []}
    for t in tasks:
        metric = _metric_for(t, [ref[t], mod[t]], cfg.metric)
        a, b = pred_items(ref[t], metric), pred_items(mod[t], metric)
        row: dict[str, Any] = {"metric": metric, "n": int(mod[t].get("n", 0))}
        for key, arr in (("agreement", None if a is None or b is None or a.size != b.size else (a == b).astype(float)),
                         ("answer_kl", None if "answer_kl" not in mod[t].get("items", {})
                          else np.asarray(mod[t]["items"]["answer_kl"], dtype=np.float64))):
            if arr is None or arr.size == 0:
                row[key] = row[f"{key}_ci"] = None
                continue
            bm = _boot_means(rng, [arr], cfg.n_boot)[0]
            row[key], row[f"{key}_ci"] = float(arr.mean()), _interval(bm, cfg.ci)
            boots[key].append(bm)
        rows[t] = row
    avg: dict[str, Any] = {}
    for key in ("agreement", "answer_kl"):
        vals = [rows[t][key] for t in tasks if rows[t][key] is not None]
        full = len(vals) == len(tasks) and tasks
        avg[key] = float(np.mean(vals)) if full else None
        avg[f"{key}_ci"] = _interval(np.mean(boots[key], axis=0), cfg.ci) if full else None
    return {"tasks": rows, "average": avg, "task_order": tasks}


def _fmt(v, ci=None, pct=False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    v = round(float(v), 9) + 0.0  # no "-0.0"
    s = f"{100 * v:.1f}%" if pct else f"{v:.1f}"
    if ci:
        lo, hi = ci
        s += f" [{100 * lo:.0f}%, {100 * hi:.0f}%]" if pct else f" [{lo:.1f}, {hi:.1f}]"
    return s


def to_markdown(rep: dict) -> str:
    """The report as a Markdown table (accuracies in %, drop/recovered in points, CIs in brackets)."""
    c = rep["config"]
    lines = [f"# {c['title']}", "",
             f"Accuracy in % ({int(100 * c['ci'])}% paired-bootstrap CI over items, {c['n_boot']} replicates, seed {c['seed']}).",
             "", "| task | metric | n | reference | degraded | recovered | drop (pts) | recovered (pts) | gap closed |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    entries = [(t, rep["tasks"][t]) for t in rep["task_order"]] + [("**average**", rep["average"])]
    for name, r in entries:
        ci = r.get("ci") or {}
        lines.append("| " + " | ".join([
            name, r["metric"], str(r["n"]),
            *[_fmt(r[k], ci.get(k)) for k in ("reference", "degraded", "recovered", "drop", "recovered_points")],
            _fmt(r["gap_closed"], ci.get("gap_closed"), pct=True)]) + " |")
    return "\n".join(lines) + "\n"


def plot(rep: dict, path: str | Path) -> Path:
    """Grouped bars (reference / degraded / recovered) per task and for the average, with CIs."""
    import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    names = list(rep["task_order"]) + ["average"]
    rows = [rep["tasks"][t] for t in rep["task_order"]] + [rep["average"]]
    x = np.arange(len(names))
    w = 0.27
    colors = {"reference": "#4c72b0", "degraded": "#c44e52", "recovered": "#55a868"}
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(names) + 2), 4.2))
    for i, m in enumerate(MODELS):
        vals = np.array([r[m] for r in rows])
        err = None
        if all(r.get("ci") and r["ci"].get(m) for r in rows):
            lo = np.array([r["ci"][m][0] for r in rows])
            hi = np.array([r["ci"][m][1] for r in rows])
            err = np.vstack([np.clip(vals - lo, 0, None), np.clip(hi - vals, 0, None)])
        ax.bar(x + (i - 1) * w, vals, w, yerr=err, capsize=2, label=m, color=colors[m])
    for xi, r in zip(x, rows):
        if r["gap_closed"] is not None:
            top = max(r[m] for m in MODELS)
            ax.text(xi, top + 2, f"{100 * r['gap_closed']:.0f}%", ha="center", fontsize=8)
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(rep["config"]["title"] + " (label: share of gap closed)", fontsize=10)
    tops = [max([r[m] for m in MODELS] + [r["ci"][m][1] for m in MODELS if r.get("ci") and r["ci"].get(m)])
            for r in rows]
    ax.set_ylim(0, min(110, max(tops) + 8))
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def build_report(reference_results, degraded_results, recovered_results, out_dir: str | Path,
                 cfg: ReportConfig | None = None) -> dict:
    """Compute the report and write ``out_dir``/report.md, report.json, report.png.

    Each ``*_results`` is what ``evaluate()`` returns, the JSON ``recover-lora eval --out-file`` writes,
    or a path to that JSON. Returns the report dict (with ``markdown`` and ``files`` added).
    """
    rep = compute_report(reference_results, degraded_results, recovered_results, cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = to_markdown(rep)
    atomic_write_bytes(out / "report.md", md.encode())
    files = {"markdown": str(out / "report.md"), "json": str(out / "report.json"), "png": str(out / "report.png")}
    plot(rep, out / "report.png")
    rep = {**rep, "markdown": md, "files": files}
    atomic_write_json(out / "report.json", rep)
    return rep


def measures_markdown(measures: dict, rep: dict | None = None) -> str:
    """The table a small evaluation can resolve: agreement with the reference's choices and the
    answer-token KL, degraded vs recovered (95% bootstrap CIs); then accuracy, but only for the
    tasks whose reference - degraded gap the items resolve (the others named, with their CI)."""
    deg, rec = measures["degraded"], measures["recovered"]
    tasks = deg["task_order"]
    n = ", ".join(f"{t} {deg['tasks'][t]['n']}" for t in tasks)
    L = [f"Against the reference, on {n} items:", "",
         "| measure | degraded | recovered |", "|---|---:|---:|"]
    for key, name, pct in (("agreement", "picks the reference's choice", True),
                           ("answer_kl", "answer-token KL to the reference (nats)", False)):
        def f(m, key=key, pct=pct):
            v, ci = m["average"][key], m["average"][f"{key}_ci"]
            if v is None:
                return "n/a"
            return (f"{100 * v:.1f}% [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if pct else
                    f"{v:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]") if ci else (f"{100 * v:.1f}%" if pct else f"{v:.3f}")
        L.append(f"| {name} | {f(deg)} | {f(rec)} |")
    if rep is None:
        return "\n".join(L) + "\n"
    resolved = [t for t in rep["task_order"] if rep["tasks"][t].get("resolved")]
    L.append("")
    if resolved:
        L += ["Accuracy (%) where the items resolve the damage (CI of reference - degraded excludes 0):", "",
              "| task | n | reference | degraded | recovered | gap closed |", "|---|---:|---:|---:|---:|---:|"]
        for t in resolved:
            r = rep["tasks"][t]
            ci = (r.get("ci") or {}).get("gap_closed")
            L.append(f"| {t} | {r['n']} | {r['reference']:.1f} | {r['degraded']:.1f} | {r['recovered']:.1f} | "
                     f"{_fmt(r['gap_closed'], ci, pct=True)} |")
    others = [t for t in rep["task_order"] if t not in resolved]
    if others:
        L += ([""] if resolved else []) + ["Accuracy does not resolve the damage on " + ", ".join(
            f"{t} (reference - degraded {_fmt(rep['tasks'][t]['drop'], (rep['tasks'][t].get('ci') or {}).get('drop'))} "
            f"points on {rep['tasks'][t]['n']} items)" for t in others)
            + ": not shown; more items (--eval.limit) would measure it."]
    return "\n".join(L) + "\n"
