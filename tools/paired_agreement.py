"""How much more often model A picks the reference's choice than model B, task by task, paired over items.

    python tools/paired_agreement.py results/study-cpu/qwen2.5-coder-0.5b/eval/reference.json \\
        results/study-cpu/qwen2.5-coder-0.5b/noise-all/full-kd/eval/recovered.json \\
        results/study-cpu/qwen2.5-coder-0.5b/noise-all/auto-eora-rewind/eval/recovered.json --leave-out mmlu boolq

Agreement is the study's measure (``compute_measures``: the share of items where a model picks what
the reference picks, under the task's metric; MMLU's subjects pooled). Both models are scored on the
same items, so the difference is bootstrapped over items with the same resampled indices for A and B
(paired), tasks resampled independently, and averaged over tasks as the study averages them. With
``--leave-out`` the average is printed again without those tasks (the ones a position prior decides).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from recover_lora.report import _boot_means, _interval, _metric_for, pred_items, task_results
from recover_lora.study.results import pool_mmlu


def _load(path: str | Path) -> dict:
    d = json.loads(Path(path).read_text())
    return task_results(pool_mmlu(d.get("results", d)))


def paired(ref: dict, a: dict, b: dict, n_boot: int = 2000, seed: int = 0) -> dict:
    """{task: (A - B agreement, replicates)}: per-item agreement differences, paired bootstrap means."""
    rng = np.random.default_rng(seed)
    out = {}
    for t in ref:
        if t not in a or t not in b:
            continue
        metric = _metric_for(t, [ref[t], a[t], b[t]], "auto")
        r, pa, pb = pred_items(ref[t], metric), pred_items(a[t], metric), pred_items(b[t], metric)
        if r is None or pa is None or pb is None or not (r.size == pa.size == pb.size):
            raise SystemExit(f"{t}: the three evaluations do not hold the same items")
        d = (pa == r).astype(float) - (pb == r).astype(float)
        out[t] = (float(d.mean()), _boot_means(rng, [d], n_boot)[0])
    return out


def average(rows: dict, tasks: list[str]) -> tuple[float, list[float] | None]:
    """Mean over ``tasks`` of the per-task differences, with its 95% interval."""
    return (float(np.mean([rows[t][0] for t in tasks])),
            _interval(np.mean([rows[t][1] for t in tasks], axis=0), 0.95))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.strip().split("\n")[0])
    p.add_argument("reference")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--leave-out", nargs="*", default=[])
    p.add_argument("--n-boot", type=int, default=2000)
    args = p.parse_args()
    rows = paired(_load(args.reference), _load(args.a), _load(args.b), args.n_boot)
    print("| task | agreement, A - B (pts) |\n|---|---:|")
    for t, (m, _) in rows.items():
        print(f"| {t} | {100 * m:+.1f} |")
    sets = [("all tasks", list(rows))]
    if args.leave_out:
        sets.append((f"without {', '.join(args.leave_out)}", [t for t in rows if t not in args.leave_out]))
    for name, tasks in sets:
        m, ci = average(rows, tasks)
        bracket = f" [{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]" if ci else ""
        print(f"| **mean, {name}** | {100 * m:+.2f}{bracket} |")


if __name__ == "__main__":
    main()
