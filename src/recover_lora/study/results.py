"""RESULTS.md (the finished runs collected, the goals checked, one chart per model), and the small
result files it is made from: packed for the trip back from a device, mirrored into the repository."""

from __future__ import annotations

import os
import re
from dataclasses import asdict
from pathlib import Path

import numpy as np
import yaml

from ..report import ReportConfig, compute_measures, compute_report, item_array, pred_items, task_results
from ..utils import RecoverLoraError, atomic_write_bytes, log, read_json, save_figure
from .config import StudyConfig, kl_closed, pct, plan, slug


def pool_mmlu(results: dict) -> dict:
    """Results with the MMLU subjects pooled into one 'mmlu' task (items concatenated), in place of the first."""
    res = task_results(results)
    subj = [t for t in res if t.startswith("mmlu_")]
    if len(subj) < 2:
        return res
    items = {m: np.concatenate([item_array(res[s]["items"][m]) for s in subj])
             for m in ("acc", "acc_norm", "pred", "pred_norm", "answer_kl")
             if all(m in res[s].get("items", {}) for s in subj)}
    n = sum(res[s].get("n", 0) for s in subj)
    entry = {m: float(np.mean(v)) for m, v in items.items() if m in ("acc", "acc_norm", "answer_kl")}
    for m in ("acc", "acc_norm"):
        if m not in entry and all(m in res[s] for s in subj):
            entry[m] = sum(res[s][m] * res[s].get("n", 1) for s in subj) / max(n, 1)
    entry.update(n=n, items=items)
    out = {}
    for t, r in res.items():
        if t == subj[0]:
            out["mmlu"] = entry
        elif t not in subj:
            out[t] = r
    return out


def _pts(x, ci=None) -> str:
    return "n/a" if x is None else f"{x:+.1f}" + (f" [{ci[0]:+.1f}, {ci[1]:+.1f}]" if ci else "")


def _minutes(done: dict) -> str:
    """train + eval minutes of a run: CPU minutes (all threads) on a CPU, wall minutes on a GPU (n sharing: --jobs)."""
    n, cpu = done.get("concurrent_runs", 1), done.get("cpu_minutes")
    sharing = f" ({n} sharing)" if n > 1 else ""
    if cpu and done.get("device_name") == "cpu":
        threads = f", {done['threads']} threads" if done.get("threads", 1) > 1 else ""
        return f"{cpu['recover']:.1f} + {cpu['eval']:.1f} CPU{sharing}{threads}"
    return f"{done['gpu_minutes']:.1f}{sharing} + {done.get('eval_minutes', 0):.1f}"


def _num(n) -> str:
    if n is None:
        return "n/a"
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


# A model that picks one choice position (the first, "A" on MMLU, ...) on this share of a task's items is
# answering from a position prior (0.5B models do so on 0-shot MMLU): its accuracy there follows how
# often the answer key uses that position, and a repair that moves the prior moves it by points.
PRIOR_SHARE = 0.8


def choice_prior(results: dict | None, metrics: dict[str, str]) -> dict[str, tuple[float, int]]:
    """Per task: (share of items on which the most often picked choice position was picked, that position),
    from the predictions of the metric the report scores (``pred_norm`` for acc_norm)."""
    out = {}
    for t, metric in metrics.items():
        preds = pred_items((results or {}).get(t) or {}, metric)
        if preds is None or preds.size == 0:
            continue
        counts = np.bincount(preds.astype(int))
        out[t] = (float(counts.max() / counts.sum()), int(counts.argmax()))
    return out


def prior_note(priors: dict[str, dict], task: str) -> str:
    """"who #1 84%, ..." (position 1-based) for a task on which some model picked one position on
    PRIOR_SHARE of its items, else ""."""
    got = {who: p[task] for who, p in priors.items() if task in p}
    if not any(share >= PRIOR_SHARE for share, _ in got.values()):
        return ""
    return ", ".join(f"{who} #{i + 1} {share:.0%}" for who, (share, i) in got.items())


def _read_results(path: Path) -> dict | None:
    return pool_mmlu(read_json(path)["results"]) if path.exists() else None


def collect(study_dir: Path, cfg: dict) -> dict:
    """{(model, damage): {"runs", "deg_measures", "methods"}} of the finished runs: per method
    {"done", "report" (accuracy tier where run, else the measures' items), "acc_tier", "measures"
    (agreement and answer-token KL to the reference)}; the degraded model's measures; the planned methods."""
    rcfg = ReportConfig()
    out = {}
    by_pair: dict[tuple[str, str], list[str]] = {}
    for r in plan(StudyConfig(**cfg)):
        by_pair.setdefault((r.model, r.damage), []).append(r.method)
    for (model, damage), methods in by_pair.items():
        mdir, ddir = study_dir / slug(model), study_dir / slug(model) / slug(damage)
        ref, deg = _read_results(mdir / "eval" / "reference.json"), _read_results(ddir / "eval" / "degraded.json")
        ref_acc = _read_results(mdir / "eval" / "reference-accuracy.json")
        deg_acc = _read_results(ddir / "eval" / "degraded-accuracy.json")
        dirs = {m: ddir / slug(m) for m in methods if (ddir / slug(m) / "done.json").exists()}
        if ref is None or deg is None:
            continue
        runs = {}
        for m, d in dirs.items():
            rec = _read_results(d / "eval" / "recovered.json")
            rec_acc = _read_results(d / "eval" / "recovered-accuracy.json")
            acc_tier = rec_acc is not None and ref_acc is not None and deg_acc is not None
            rows = (ref_acc, deg_acc, rec_acc) if acc_tier else (ref, deg, rec)
            rep = compute_report(*rows, rcfg)
            metrics = {t: e["metric"] for t, e in rep["tasks"].items()}
            # no accuracy tier configured (study.yaml: every item is evaluated once): that evaluation is the accuracy run
            runs[m] = {"done": read_json(d / "done.json"), "report": rep, "acc_tier": acc_tier or not cfg.get("accuracy"),
                       "measures": compute_measures(ref, rec, rcfg),
                       "priors": dict(zip(("reference", "degraded", m), (choice_prior(x, metrics) for x in rows)))}
        out[(model, damage)] = {"runs": runs, "deg_measures": compute_measures(ref, deg, rcfg), "methods": methods}
    return out


def goal_methods(goals: dict) -> list[str]:
    """The method(s) the goals are checked for: ``goals.method`` is one name or a list."""
    m = goals["method"]
    return [m] if isinstance(m, str) else list(m)


def check_goals(runs: dict, goals: dict) -> dict[str, tuple[str, str]]:
    """The study issue's goals for one (model, damage): {goal: (PASS | FAIL | n/a, detail)}.
    ``runs``: method -> {"done", "report", "measures"} (:func:`collect`)."""
    best = goals["method"]
    need = goals.get("min_gap_closed", 0.9)
    if best not in runs:
        return dict.fromkeys(("kl", "gap", "presets", "baselines", "no_worse"), ("n/a", f"{best} not run"))
    r = runs[best]
    out: dict[str, tuple[str, str]] = {}
    kc = kl_closed(r["done"])
    out["kl"] = ("n/a", "no held-out KL") if kc is None else ("PASS" if kc >= need else "FAIL", pct(kc))
    res = r["report"].get("resolved_average")
    if not res or res.get("gap_closed") is None:
        out["gap"] = ("n/a", "no task's accuracy gap resolved (CI of reference - degraded includes 0)")
    else:
        g, ci = res["gap_closed"], (res.get("ci") or {}).get("gap_closed")
        # a row without an accuracy run: its gap is read on the measures' fewer items (wider CIs)
        few = "" if r.get("acc_tier") else " (on the measures' items: no accuracy run)"
        out["gap"] = ("PASS" if g >= need else "FAIL", f"{pct(g, ci)} over {', '.join(res['tasks'])}{few}")

    def after(m):
        return runs[m]["done"]["heldout"]["after"]["kl"]

    def akl(m):
        return runs[m]["measures"]["average"].get("answer_kl")

    for key, names, strict in (("presets", goals.get("presets", []), False), ("baselines", goals.get("baselines", []), True)):
        missing = [n for n in names if n not in runs]
        if not names:
            out[key] = ("n/a", "none planned")
            continue
        if missing:
            out[key] = ("n/a", f"missing {', '.join(missing)}")
            continue
        ok = all(after(best) < after(n) if strict else after(best) <= after(n) for n in names)
        if strict:  # beating a baseline: on the answer tokens of the benchmarks too, where measured
            ok = ok and all(akl(best) is None or akl(n) is None or akl(best) < akl(n) for n in names)
        out[key] = ("PASS" if ok else "FAIL", ", ".join(f"{n} {after(n):.3f}" for n in names))
    worse: dict[bool, list[str]] = {True: [], False: []}  # a task moved farther from the reference than
    for m, v in runs.items():  # the degraded model was, beyond its CI: the goal's method's fails the goal
        if not v.get("acc_tier"):
            continue
        rep = v["report"]
        for t in rep["task_order"]:
            ci = (rep["tasks"][t].get("ci") or {}).get("distance_closed")
            if ci and ci[1] < 0:
                note = prior_note(v.get("priors") or {}, t)
                note = f"; one choice position: {note}" if note else ""
                worse[m == best].append(f"{m}: {t} {_pts(rep['tasks'][t]['distance_closed'], ci)} (distance to the reference{note})")
    others = f"; other methods: {'; '.join(worse[False])}" if worse[False] else ""
    if not r.get("acc_tier"):
        out["no_worse"] = ("n/a", f"{best} has no accuracy run" + others)
    else:
        out["no_worse"] = ("FAIL", "; ".join(worse[True]) + others) if worse[True] else ("PASS", f"no task worse{others}")
    return out


def chart_order(methods: list[str], goals: dict, sweep_method: str | None) -> list[str]:
    """The finished methods in the order a reader compares them: the goals' method, the presets, the
    baselines, the other methods (checks and variants), the data sweep's runs last."""
    first = [m for m in goal_methods(goals) + list(goals.get("presets") or []) + list(goals.get("baselines") or [])
             if m in methods]
    sweep = [m for m in methods if sweep_method and m.startswith(f"{sweep_method}@")]
    rest = [m for m in methods if m not in first and m not in sweep]
    return list(dict.fromkeys(first + rest + sweep))


def plot_kl(model: str, damages: list[str], methods: list[str], data: dict, path: Path) -> Path:
    """Grouped bars: held-out KL to the reference after each method (the degraded model first),
    one bar per damage, log scale."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["degraded"] + methods
    fig, ax = plt.subplots(figsize=(max(6.0, 0.8 * len(names) + 2), 4))
    w = 0.8 / max(1, len(damages))
    x = np.arange(len(names))
    for i, dmg in enumerate(damages):
        runs = data.get((model, dmg), {}).get("runs", {})
        before = next((v["done"]["heldout"]["before"]["kl"] for v in runs.values()), np.nan)
        vals = [before] + [runs[m]["done"]["heldout"]["after"]["kl"] if m in runs else np.nan for m in methods]
        ax.bar(x + (i - (len(damages) - 1) / 2) * w, vals, w, label=dmg)
    ax.set_yscale("log")
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("held-out KL to the reference (log)")
    ax.set_title(f"{model}: held-out KL after each repair (lower is better)", fontsize=10)
    ax.legend(fontsize=8, title="damage", title_fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return save_figure(fig, path)


def cpu_used(study_dir: Path, data: dict, model: str | None = None) -> str:
    """One line: the CPU (or GPU) time a model's finished runs took (every model's: None), and what they
    shared (the synthetic pool, the reference's and degraded models' evaluations, made once)."""
    dones = [r["done"] for (m, _), e in data.items() if model in (None, m) for r in e["runs"].values()]
    on_cpu = all(d.get("device_name") == "cpu" for d in dones)
    if on_cpu:
        train = sum((d.get("cpu_minutes") or {}).get("recover", 0) for d in dones) / 60
        ev = sum((d.get("cpu_minutes") or {}).get("eval", 0) for d in dones) / 60
    else:
        train = sum(d.get("gpu_minutes", 0) for d in dones) / 60
        ev = sum(d.get("eval_minutes", 0) for d in dones) / 60
    pool = shared = lost = 0.0
    for mdir in [study_dir / slug(model)] if model else sorted({study_dir / slug(m) for m, _ in data}):
        timing = read_json(mdir / "timing.json") if (mdir / "timing.json").exists() else {}
        pool += timing.get("synth_pool_cpu" if on_cpu else "synth_pool", 0) / 3600
        lost += timing.get("synth_pool_cpu_lost" if on_cpu else "synth_pool_lost", 0) / 3600  # a pool made again
        for f in mdir.glob("*/*/timing.json"):  # attempts that left nothing (run.write_off_lost), finished runs or not
            t = read_json(f)
            lost += sum(t.get(f"{k}{'_cpu' if on_cpu else ''}_lost", 0) for k in ("recover", "eval")) / 3600
        for f in mdir.glob("*/*/earlier/*/timing.json"):  # a finished attempt set aside (study --again): all of it
            t = read_json(f)
            lost += sum(t.get(f"{k}{'_cpu' if on_cpu else ''}{x}", 0) for k in ("recover", "eval", "diagnose")
                        for x in ("", "_lost")) / 3600
        for f in [*mdir.glob("eval/*.json"), *mdir.glob("*/eval/degraded*.json")]:
            d = read_json(f)  # an evaluation's results, or a recheck's list of evaluations made again
            shared += sum(e.get("seconds") or 0 for e in (d if isinstance(d, list) else [d])) / 3600  # wall
    unit = "CPU-hours" if on_cpu else "GPU-hours"
    return (f"Time used: {len(dones)} finished runs {train + ev:.1f} {unit} (recover {train:.1f}, evaluations "
            f"{ev:.1f}); made once and shared: the synthetic pool {60 * pool:.1f} {unit[:3]}-minutes, the "
            f"reference's and degraded models' evaluations "
            + (f"{shared:.1f} hours (wall)." if shared >= 1 else f"{60 * shared:.1f} minutes (wall).")
            + (f" Lost to work a machine took with it (runs started over, pools made again): {lost:.1f} {unit}."
               if lost >= 0.05 else ""))


def winners(data: dict, sweep_method: str | None) -> list[str]:
    """'What wins where': per model and damage, the method best on each measure (the data sweep's runs,
    which are the sweep method with more data, left out)."""
    L = ["## What wins where", "",
         "Per model and damage, the best finished method on each measure (the data sweep's runs left out; "
         "brackets: the runner-up; *at N*: the trainable parameters, shown where the two differ). Accuracy: "
         "the resolved gap closed, among the headline rows.", "",
         "| model | damage | held-out KL (lowest) | agreement (highest) | answer-token KL (lowest) | resolved gap closed |",
         "|---|---|---|---|---|---|"]

    def best(runs, key, fmt, low=True):
        vals = sorted(((v, m) for m, r in runs.items() if (v := key(r)) is not None), reverse=not low)
        if not vals:
            return "n/a"
        # a larger adapter winning is not the same method winning: say the sizes when they differ
        size = {m: runs[m]["done"].get("trainable_parameters") for _, m in vals[:2]}
        at = (lambda m: f" at {_num(size[m])}") if len(set(size.values())) > 1 else (lambda m: "")
        top = f"**{vals[0][1]}** {fmt(vals[0][0])}{at(vals[0][1])}"
        return top + (f" ({vals[1][1]} {fmt(vals[1][0])}{at(vals[1][1])})" if len(vals) > 1 else "")

    for (model, damage), e in data.items():
        runs = {m: r for m, r in e["runs"].items() if not (sweep_method and m.startswith(f"{sweep_method}@"))}
        if not runs:
            continue
        cells = [best(runs, lambda r: r["done"]["heldout"]["after"]["kl"], lambda v: f"{v:.3f}"),
                 best(runs, lambda r: r["measures"]["average"].get("agreement"), lambda v: f"{100 * v:.1f}%", low=False),
                 best(runs, lambda r: r["measures"]["average"].get("answer_kl"), lambda v: f"{v:.3f}"),
                 best(runs, lambda r: (r["report"].get("resolved_average") or {}).get("gap_closed") if r["acc_tier"]
                      else None, pct, low=False)]
        L.append(f"| {model} | {damage} | " + " | ".join(cells) + " |")
    return L + [""]


def overview(data: dict, goals: dict) -> tuple[list[tuple[str, str]], list[str], dict, dict]:
    """The study at a glance: per (model, damage) with a finished run, the share of the held-out KL each
    of the goals' methods (the goal's, the presets, the baselines) removed and its agreement with the
    reference's choices (key (group, method); the degraded model's agreement under method "degraded")."""
    core = goal_methods(goals) + list(goals.get("presets") or []) + list(goals.get("baselines") or [])
    groups = [g for g, e in data.items() if any(m in e["runs"] for m in core)]
    methods = [m for m in dict.fromkeys(core) if any(m in data[g]["runs"] for g in groups)]
    removed, agree = {}, {}
    for g in groups:
        runs = data[g]["runs"]
        agree[(g, "degraded")] = data[g]["deg_measures"]["average"].get("agreement")
        for m in methods:
            if m in runs:
                removed[(g, m)] = kl_closed(runs[m]["done"])
                agree[(g, m)] = runs[m]["measures"]["average"].get("agreement")
    return groups, methods, removed, agree


def plot_overview(data: dict, goals: dict, path: Path) -> Path | None:
    """One chart of the whole study: grouped bars per (model, damage), the share of the held-out KL removed
    (against the goal's line) above, the agreement with the reference's choices below (the degraded
    model's as a black line across its group)."""
    groups, methods, removed, agree = overview(data, goals)
    if not groups:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(2, 1, figsize=(max(7.0, 1.3 * len(groups) + 2.5), 6.5), sharex=True)
    w = 0.8 / len(methods)
    x = np.arange(len(groups))
    for i, m in enumerate(methods):
        off = x + (i - (len(methods) - 1) / 2) * w
        a1.bar(off, [100 * v if (v := removed.get((g, m))) is not None else np.nan for g in groups], w, label=m)
        a2.bar(off, [100 * v if (v := agree.get((g, m))) is not None else np.nan for g in groups], w)
    goal = goals.get("min_gap_closed", 0.9)
    a1.axhline(100 * goal, ls="--", c="tab:red", lw=1, label=f"goal: {100 * goal:.0f}%")
    a1.set_ylabel("held-out KL removed (%)")
    low = min([100 * v for v in removed.values() if v is not None] + [0.0])  # a repair can make it worse
    a1.set_ylim(low - 5 if low < 0 else 0, 100)
    deg = [100 * v if (v := agree.get((g, "degraded"))) is not None else np.nan for g in groups]
    a2.hlines(deg, x - 0.4, x + 0.4, colors="k", lw=2, zorder=3, label="degraded (agreement)")
    lo = np.nanmin([100 * v for v in agree.values() if v is not None])  # the degraded model's included
    a2.set_ylim(max(0.0, lo - 5), 100)
    a2.set_ylabel("agreement with the reference (%)")
    a2.set_xticks(x, [f"{m}\n{d}" for m, d in groups], fontsize=8)
    handles, labels = (sum(z, []) for z in zip(a1.get_legend_handles_labels(), a2.get_legend_handles_labels()))
    a1.legend(handles, labels, fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0), title="method",
              title_fontsize=8)
    a1.set_title("The study at a glance: each repair against the reference (higher is better)", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def sweep_table(model: str, damage: str, runs: dict, method: str, chart: Path, rel: str,
                goal: float | None = None) -> list[str]:
    """The data sweep of one model and damage: the sweep method at each amount of synthetic data (its
    own run at the pool's size among them), a table and a chart against synthetic tokens (``goal``: the
    share of the held-out KL the goals ask for, drawn as a line)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = sorted(((r["done"]["train_tokens"], m, r) for m, r in runs.items()
                  if m == method or m.startswith(f"{method}@")), key=lambda t: t[0])
    if len(pts) < 2:
        return []
    L = [f"Synthetic data sweep of {method} ({model}, {damage}): one pass over each amount.", "",
         "| synthetic sequences | steps | synthetic tokens | held-out KL after (removed) | agreement | answer-token KL | recover minutes |",
         "|---:|---:|---:|---:|---:|---:|---:|"]
    for tok, m, r in pts:
        d, ms = r["done"], r["measures"]["average"]
        L.append(f"| {d['synthetic_sequences']:,} | {d['steps']} | {_num(tok)} | {d['heldout']['after']['kl']:.3f} "
                 f"({pct(kl_closed(d))}) | {_m(ms.get('agreement'), ms.get('agreement_ci'), pct=True)} | "
                 f"{_m(ms.get('answer_kl'), ms.get('answer_kl_ci'))} | {_minutes(d).split(' + ')[0]} |")
    x = [t for t, _, _ in pts]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
    # the share of the held-out KL removed, against the goal's line and the warm start alone: on a KL
    # axis the degraded model's level would flatten what the data changes
    a1.plot(x, [100 * kl_closed(r["done"]) for _, _, r in pts], "o-", label=method)
    starts = [r["done"]["heldout"]["init"]["kl"] / r["done"]["heldout"]["before"]["kl"]
              for _, _, r in pts if (r["done"]["heldout"].get("init") or {}).get("kl") is not None]
    if starts:
        a1.axhline(100 * (1 - float(np.mean(starts))), ls=":", c="gray", label="its start alone (no training)")
    if goal is not None:
        a1.axhline(100 * goal, ls="--", c="tab:red", lw=1, label=f"goal: {100 * goal:.0f}%")
    a1.set_ylabel("held-out KL removed (%)")
    agr = [r["measures"]["average"].get("agreement") for _, _, r in pts]
    a2.plot(x, [100 * a if a is not None else np.nan for a in agr], "o-")
    a2.set_ylabel("agreement with the reference (%)")
    for a in (a1, a2):
        a.set_xscale("log")
        a.set_xticks(x, [_num(t) for t in x])
        a.minorticks_off()
        a.set_xlabel("synthetic tokens distilled on (log)")
    a1.legend(fontsize=8)
    fig.suptitle(f"{model}, {damage}: {method} against synthetic data", fontsize=10)
    fig.tight_layout()
    save_figure(fig, chart)
    return L + ["", f"![data sweep]({rel})", ""]


def _where(runs: list[dict]) -> str:
    """What a study's runs ran on, for a column head: "CPU", "GPU" or both."""
    kinds = {"CPU" if r["done"].get("device_name") == "cpu" else "GPU" for r in runs}
    return " + ".join(sorted(kinds)) or "?"


def plot_beside(pairs: list, data: dict, odata: dict, labels: tuple[str, str], path: Path) -> Path:
    """The runs of two studies side by side: per (model, damage, method) finished in both, the share of
    the held-out KL each removed (solid: this study, hatched: the other)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(pairs) + 2.0), 3.8))
    x = np.arange(len(pairs))
    for k, (d, lab, style) in enumerate(((data, labels[0], {}), (odata, labels[1], {"hatch": "//", "alpha": 0.6}))):
        vals = [np.nan if (v := kl_closed(d[g]["runs"][m]["done"])) is None else 100 * v for g, m in pairs]
        ax.bar(x + (k - 0.5) * 0.4, vals, 0.4, label=lab, color="tab:blue", edgecolor="k", lw=0.5, **style)
    ax.set_xticks(x, [f"{m}\n{g[0]} {g[1]}" for g, m in pairs], fontsize=7, rotation=45, ha="right")
    ax.set_ylabel("held-out KL removed (%)")
    ax.set_ylim(min(0.0, ax.get_ylim()[0]), 100)
    ax.legend(fontsize=8)
    ax.set_title("The same runs in two studies", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def beside_table(data: dict, beside: str | Path, out: Path) -> list[str]:
    """RESULTS.md's section that puts another study's finished runs (``beside``: its config; its
    mirror, else its study folder) beside this one's: per (model, damage, method) finished in both,
    the held-out KL removed, the agreement with the reference, the resolved accuracy gap closed (where
    each measured accuracy), the synthetic tokens and the minutes. Empty when none are in both."""
    other = StudyConfig.from_yaml(beside)
    odir = Path(other.mirror) if other.mirror and (Path(other.mirror) / "study.json").exists() else Path(other.study_dir)
    if not odir.exists():
        return []
    odata = collect(odir, asdict(other))
    pairs = [(k, m) for k, v in data.items() if k in odata for m in v["runs"] if m in odata[k]["runs"]]
    if not pairs:
        return []
    here = _where([data[k]["runs"][m] for k, m in pairs])
    there = _where([odata[k]["runs"][m] for k, m in pairs])
    name = os.path.basename(beside)
    steps = (other.recover.get("distill") or {}).get("steps")
    chart = out.parent / "results" / f"beside-{slug(os.path.splitext(name)[0])}.png"
    plot_beside(pairs, data, odata, (here, there), chart)
    L = [f"## Beside: `{name}` ({there})", "", f"![beside]({os.path.relpath(chart, out.parent)})", "",
         f"The runs of `{name}` ({os.path.relpath(other.results, out.parent)}) that this study ran too (same model, "
         f"damage and method); each cell is *this study* / *{name}*. There: "
         f"{other.eval.get('limit') or 'every'} item{'s' if other.eval.get('limit') else ''} a task"
         f"{f', {steps} steps' if steps else ''}. The gap closed is over each study's own resolved tasks "
         "(-: no accuracy run).", "",
         f"| model | damage | method | held-out KL removed | agreement | resolved gap closed | synthetic tokens | "
         f"minutes, {here} / {there} |", "|---|---|---|---:|---:|---:|---:|---:|"]

    def cells(e: dict, m: str) -> tuple[str, ...]:
        r = e["runs"][m]
        done, ms = r["done"], r["measures"]["average"]
        gap = (r["report"].get("resolved_average") or {}).get("gap_closed") if r["acc_tier"] else None
        tokens = "0" if done.get("recover_method") == "sft-lora" else _num(done["train_tokens"])  # (labeled data)
        return (pct(kl_closed(done)), _m(ms["agreement"], pct=True), "-" if gap is None else pct(gap), tokens,
                _minutes(done))

    shown = set()
    for (model, damage), m in pairs:
        if (model, damage) not in shown:  # the degraded model's agreement first: what each study starts from
            shown.add((model, damage))
            a, b = (_m(e[(model, damage)]["deg_measures"]["average"]["agreement"], pct=True) for e in (data, odata))
            L.append(f"| {model} | {damage} | degraded | - | {a} / {b} | - | - | - |")
        a, b = cells(data[(model, damage)], m), cells(odata[(model, damage)], m)
        L.append(f"| {model} | {damage} | {m} | " + " | ".join(f"{x} / {y}" for x, y in zip(a, b)) + " |")
    return L + [""]


def _m(x, ci=None, pct=False, digits=3) -> str:
    if x is None:
        return "n/a"
    if pct:
        return f"{100 * x:.1f}%" + (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "")
    return f"{x:.{digits}f}" + (f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if ci else "")


def _precision(cfg: dict) -> str:
    """The study's matmul precision in a sentence (nothing when fp32 / the device's default)."""
    train = ((cfg.get("recover") or {}).get("distill") or {}).get("autocast")
    score = (cfg.get("eval") or {}).get("autocast")
    per_model = "; ".join(f"{m} in {p} throughout" for m, p in (cfg.get("precision") or {}).items())
    per_model = f" Per model: {per_model} (its training and scoring alike)." if per_model else ""
    if train in (None, "auto", "off") and score in (None, "off"):
        return per_model
    return (f" Training under {train or 'auto'} autocast, scoring under {score or 'no'} autocast (fp32 weights, "
            f"bf16 matmuls: BENCHMARKS.md measures what it changes).{per_model}")


def write_results(study_dir: str | Path, out: str | Path = "RESULTS.md", cfg: StudyConfig | dict | None = None) -> Path:
    """RESULTS.md (and one chart per model in ``<out's folder>/results/``) from the finished runs."""
    study_dir, out = Path(study_dir), Path(out)
    if cfg is None:
        if not (study_dir / "study.json").exists():
            raise RecoverLoraError(f"{study_dir}/study.json not found: run the study (or --dry-run is not enough)")
        cfg = read_json(study_dir / "study.json")
    cfg = asdict(cfg) if isinstance(cfg, StudyConfig) else cfg
    scfg = StudyConfig(**cfg)
    goals = cfg["goals"]
    data = collect(study_dir, cfg)
    dones = [v["done"] for e in data.values() for v in e["runs"].values()]
    devices = sorted({d.get("device_name") or "?" for d in dones})
    ev, acc = cfg["eval"], cfg.get("accuracy") or {}
    L = ["# Study results", "",
         f"{len(dones)} of {len(plan(scfg))} planned runs finished, from `{os.path.relpath(study_dir, out.parent)}`. "
         f"Device: {', '.join(devices) or 'n/a'}.{_precision(cfg)} {cpu_used(study_dir, data)}", "",
         "Measures of every run, against the reference: the **held-out KL** (KL(reference || model) per token on "
         "held-out synthetic sequences, before -> after, and the share of it removed) and its top-1 agreement; on "
         f"the benchmark items ({ev.get('limit') or 'all'} a task, MMLU = its three subjects pooled): the "
         "**agreement** with the reference's choices (share of items where the model picks what the reference "
         "picks, under the task's metric) and the **answer-token KL** (KL(reference || model) averaged over the "
         "tokens of every choice of an item). Both resolve differences that accuracy on a few hundred items "
         "cannot; brackets are 95% bootstrap CIs over items (mean over tasks).", "",
         f"Accuracy (acc_norm where the task defines it, else acc) on {acc.get('limit') or 'the same'} items a "
         "task for the reference, the degraded model and the headline methods: a task's gap is *resolved* when the "
         "95% paired-bootstrap CI of reference - degraded excludes zero; *gap closed* = the share of the distance to "
         "the reference closed, sum |ref - deg| - |ref - rep| over sum |ref - deg|, over the resolved tasks only (the "
         "others are named, not averaged in): (repaired - degraded) / (reference - degraded) when the damage lowered "
         "every task, and still right when it lifted one above the reference (BoolQ under noise); a task is *worse* "
         "when the repaired model is farther from the reference than the degraded one, beyond its CI. "
         "*minutes*: of `recover` (data of its own, training, saving) and of the run's evaluations; on a CPU "
         "the process's CPU minutes (all threads; time spent waiting does not count), on a GPU wall minutes; "
         "*synthetic tokens*: tokens distilled on.", ""]
    names = goal_methods(goals)
    L += ["## Goals", "",
          f"For {' and '.join(f'`{m}`' for m in names)}: (1) removes >= {100 * goals.get('min_gap_closed', 0.9):.0f}% "
          f"of the held-out KL; (2) closes >= {100 * goals.get('min_gap_closed', 0.9):.0f}% of the resolved accuracy "
          f"gap; (3) held-out KL no worse than the presets ({', '.join(goals.get('presets', [])) or 'none named'}); "
          f"(4) beats {', '.join(goals.get('baselines', [])) or 'none named'} on held-out and answer-token KL; (5) makes "
          "no task worse than the degraded model beyond its CI (other methods that did are named).", "",
          "| model | damage | method | (1) KL removed | (2) resolved gap closed | (3) >= presets | (4) beats baselines | (5) none worse |",
          "|---|---|---|---|---|---|---|---|"]
    for (model, damage), v in data.items():
        for m in names:
            if m not in v["methods"]:
                continue
            # a model's plan may leave a preset or baseline out (Gemma-3 and Qwen run no svd-only): the goal
            # compares with those planned for this (model, damage), and waits only for those
            g = check_goals(v["runs"], {**goals, "method": m, **{k: [n for n in goals.get(k, []) if n in v["methods"]]
                                                                for k in ("presets", "baselines")}})
            L.append(f"| {model} | {damage} | {m} | " + " | ".join(
                f"**{g[k][0]}** {g[k][1]}" for k in ("kl", "gap", "presets", "baselines", "no_worse")) + " |")
    if not data:
        L.append("| - | - | - | no finished run | | | | |")
    L.append("")
    if cfg.get("notes") and Path(cfg["notes"]).exists():  # the hand-written reading of the tables (where, why)
        L += [Path(cfg["notes"]).read_text().strip(), ""]
    sweep_method = (cfg.get("sweep") or {}).get("method")
    L += winners(data, sweep_method)
    glance = out.parent / "results" / "overview.png"
    if plot_overview(data, goals, glance):
        L += [f"![the study at a glance]({os.path.relpath(glance, out.parent)})", ""]
    if cfg.get("beside"):
        try:
            L += beside_table(data, cfg["beside"], out)
        except (RecoverLoraError, OSError, KeyError) as e:  # the other study's files: not this one's results
            log.warning("RESULTS.md: no table beside %s (%s)", cfg["beside"], e)
    for model, spec in cfg["models"].items():
        keys = [k for k in data if k[0] == model]
        if not keys:
            continue
        methods = chart_order([m for m in dict.fromkeys(m for k in keys for m in data[k]["methods"])
                               if any(m in data[k]["runs"] for k in keys)], goals, sweep_method)
        chart = out.parent / "results" / f"{slug(model)}-heldout-kl.png"
        L += [f"## {model} (`{spec}`)", ""]
        if methods:  # (a model whose first run is still going has only its degraded rows: no chart yet)
            plot_kl(model, [k[1] for k in keys], methods, data, chart)
            L += [f"![held-out KL]({os.path.relpath(chart, out.parent)})", ""]
        L += [cpu_used(study_dir, data, model), ""]
        timing = study_dir / slug(model) / "timing.json"
        if timing.exists() and (study_dir / slug(model) / "synth" / "manifest.json").exists():
            man = read_json(study_dir / slug(model) / "synth" / "manifest.json")
            L += [f"Shared synthetic data pool: {man['num_sequences']:,} x {man['seq_len']} tokens, "
                  f"{read_json(timing).get('synth_pool', 0) / 60:.1f} min.", ""]
        for _, damage in keys:
            v = data[(model, damage)]
            ops = ((cfg.get("damage_overrides") or {}).get(model) or {}).get(damage, cfg["damages"][damage])
            L += [f"### {damage}: `{'; '.join(map(str, ops))}`", "",
                  "| method | held-out KL: before -> after (removed) | held-out KL after the warm start alone | held-out top-1 | "
                  "agreement with the reference | answer-token KL | trainable params | synthetic tokens | "
                  "minutes (train + eval) |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
            dm = v["deg_measures"]["average"]
            first = next(iter(v["runs"].values()), None)
            hb = first["done"]["heldout"]["before"] if first else {}
            L.append(f"| degraded | {_m(hb.get('kl'))} | - | {_m(hb.get('top1'), pct=True)} | "
                     f"{_m(dm['agreement'], dm['agreement_ci'], pct=True)} | {_m(dm['answer_kl'], dm['answer_kl_ci'])} "
                     "| - | - | - |")
            for m, r in v["runs"].items():
                done, ms = r["done"], r["measures"]["average"]
                h = done["heldout"]
                tokens = (f"0 (labeled: {_num(done['train_tokens'])})" if done.get("recover_method") == "sft-lora"
                          else _num(done["train_tokens"]))
                start = (f"{h['init']['kl']:.3f} ({pct(1 - h['init']['kl'] / h['before']['kl'])})"
                         if h.get("init") and done.get("steps") else "-")  # a training-free run is its start
                if (done.get("warm_start_check") or {}).get("kept") == "warm start":
                    start += ", kept: training made it worse"
                L.append(f"| {m} | {h['before']['kl']:.3f} -> {h['after']['kl']:.3f} ({pct(kl_closed(done))}) | {start} | "
                         f"{_m(h['after'].get('top1'), pct=True)} | {_m(ms['agreement'], ms['agreement_ci'], pct=True)} | "
                         f"{_m(ms['answer_kl'], ms['answer_kl_ci'])} | {_num(done['trainable_parameters'])} | {tokens} | "
                         f"{_minutes(done)} |")
            L.append("")
            acc_runs = {m: r for m, r in v["runs"].items() if r["acc_tier"]}
            shown = acc_runs or v["runs"]
            if not shown:
                continue
            rep0 = next(iter(shown.values()))["report"]
            tasks = rep0["task_order"]
            n_items = ", ".join(f"{t} {rep0['tasks'][t]['n']}" for t in tasks)
            L += [f"Accuracy (%), items: {n_items}; resolved tasks in bold." + ("" if acc_runs else
                  " (These are the measures' items: no accuracy run on more items yet.)"), "",
                  "| accuracy (%) | " + " | ".join(f"**{t}**" if rep0["tasks"][t].get("resolved") else t for t in tasks)
                  + " | avg | avg, resolved |", "|---|" + "---:|" * (len(tasks) + 2)]
            ra = rep0.get("resolved_average") or {}
            for who in ("reference", "degraded"):
                L.append(f"| {who} | " + " | ".join(f"{rep0['tasks'][t][who]:.1f}" for t in tasks)
                         + f" | {rep0['average'][who]:.1f} | {_m(ra.get(who), digits=1)} |")
            for m, r in shown.items():
                rep = r["report"]
                rr = rep.get("resolved_average") or {}
                L.append(f"| {m} | " + " | ".join(f"{rep['tasks'][t]['recovered']:.1f}" for t in tasks)
                         + f" | {rep['average']['recovered']:.1f} | {_m(rr.get('recovered'), digits=1)} |")
            L += ["", "| method | distance closed, resolved avg (pts) | gap closed, resolved | gap closed, all tasks | worst task (distance closed, pts) |",
                  "|---|---:|---:|---:|---|"]
            for m, r in shown.items():
                rep = r["report"]
                rr, a = rep.get("resolved_average") or {}, rep["average"]
                rci, aci = rr.get("ci") or {}, a.get("ci") or {}
                wt = min(tasks, key=lambda t: rep["tasks"][t]["distance_closed"])
                wci = (rep["tasks"][wt].get("ci") or {}).get("distance_closed")
                L.append(f"| {m} | {_pts(rr.get('points_closed'), rci.get('points_closed'))} | "
                         f"{pct(rr.get('gap_closed'), rci.get('gap_closed'))} | {pct(a['gap_closed'], aci.get('gap_closed'))} | "
                         f"{wt} {_pts(rep['tasks'][wt]['distance_closed'], wci)} |")
            if rep0.get("unresolved"):
                L.append(f"\nGap not resolved (not averaged in): {', '.join(rep0['unresolved'])}.")
            first_pr = next(iter(shown.values())).get("priors") or {}
            priors = {w: first_pr.get(w, {}) for w in ("reference", "degraded")}
            priors.update({m: (r.get("priors") or {}).get(m, {}) for m, r in shown.items()})
            notes = [f"{t}: {n}" for t in tasks if (n := prior_note(priors, t))]
            if notes:
                L.append(f"\nOne choice position picked on at least {PRIOR_SHARE:.0%} of a task's items (#1 = the first "
                         "choice: A on MMLU, \"no\" on BoolQ): accuracy there follows how often the answer key uses "
                         "that position, not what the model knows; the answer-token KL is the measure to read. "
                         f"{'; '.join(notes)}.")
            L.append("")
            if sweep_method:
                chart = out.parent / "results" / f"{slug(model)}-{slug(damage)}-sweep.png"
                L += sweep_table(model, damage, v["runs"], sweep_method, chart, os.path.relpath(chart, out.parent),
                                 goal=goals.get("min_gap_closed", 0.9))
    if any(d.get("recover_method") == "sft-lora" for d in dones):
        L += ["sft-lora trains on labeled train splits (ARC-Easy, ARC-Challenge, OpenBookQA, PIQA by default); "
              "HellaSwag, WinoGrande, BoolQ and MMLU ship no train split here, so on those it could not train "
              "in-task and is measured out of task.", ""]
    L += ["## Methods", "", "| method | RecoverConfig overrides |", "|---|---|"]
    L += [f"| {m} | `{yaml.safe_dump(o, default_flow_style=True, width=1000).strip()}` |" for m, o in scfg.all_methods().items()]
    L += ["", f"Common settings: `{yaml.safe_dump(cfg['recover'], default_flow_style=True, width=1000).strip()}`; "
          f"measures: `{yaml.safe_dump({k: ev.get(k) for k in ('tasks', 'limit', 'answer_kl')}, default_flow_style=True, width=1000).strip()}`; "
          f"accuracy: `{yaml.safe_dump(acc, default_flow_style=True, width=1000).strip()}`; damage seed {cfg['damage_seed']}.", ""]
    log_p = study_dir / "commands.log"
    if log_p.exists():
        # paths under the results' folder are shown relative to it, so the commands read the same on any clone
        roots = {str(out.parent.absolute()) + os.sep, str(out.parent.resolve()) + os.sep}

        def relative(cmd: str) -> str:
            for root in roots:
                cmd = re.sub(rf"(?<=[ =]){re.escape(root)}", "", cmd)
            return cmd

        cmds = dict.fromkeys(relative(line.split("\t", 2)[-1].strip())
                             for line in log_p.read_text().splitlines() if line.strip())
        L += ["## Commands", "", "Every invocation that ran part of the study (time, device and command are in "
              f"`{os.path.relpath(log_p, out.parent)}`):", "", "```"] + list(cmds) + ["```", ""]
    atomic_write_bytes(out, "\n".join(L).encode())
    return out
