"""Where a model's choices differ from the reference's on one task, and which way accuracy counts them.

    python tools/disagreements.py results/study-cpu/smollm2/eval/reference-accuracy.json \\
        results/study-cpu/smollm2/noise-kv/eval/degraded-accuracy.json \\
        results/study-cpu/smollm2/noise-kv/auto-eora/eval/recovered-accuracy.json --task hellaswag

Reads the per-item predictions and correctness that every evaluation JSON of recover-lora keeps
(``items``: ``pred`` / ``acc``, ``pred_norm`` / ``acc_norm``) and prints, per model: the items whose
choice differs from the reference's, those only the reference gets right, those only the model gets
right, and what chance changes would give (a changed choice where the reference was right loses the
item; where it was wrong, it wins it back one time in (choices - 1)).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def counts(ref: dict, other: dict, metric: str, choices: int) -> dict:
    """Disagreements of ``other`` with ``ref`` on one task's items, under ``metric`` (acc or acc_norm)."""
    pred = "pred_norm" if metric == "acc_norm" else "pred"
    rp, op, ra, oa = ref[pred], other[pred], ref[metric], other[metric]
    if len(rp) != len(op):
        raise SystemExit(f"the two evaluations hold different items ({len(rp)} against {len(op)})")
    diff = [i for i in range(len(rp)) if rp[i] != op[i]]
    acc_ref = sum(int(x) for x in ra) / len(ra)
    return {"items": len(rp), "differ": len(diff),
            "reference_only_right": sum(ra[i] == "1" and oa[i] == "0" for i in diff),
            "model_only_right": sum(ra[i] == "0" and oa[i] == "1" for i in diff),
            "chance": (round(acc_ref * len(diff), 1), round((1 - acc_ref) * len(diff) / (choices - 1), 1))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.strip().split("\n")[0])
    p.add_argument("reference")
    p.add_argument("models", nargs="+")
    p.add_argument("--task", required=True)
    p.add_argument("--metric", default="acc_norm")
    p.add_argument("--choices", type=int, default=4, help="answer choices an item has (HellaSwag, ARC: 4)")
    a = p.parse_args()
    ref = json.loads(Path(a.reference).read_text())["results"][a.task]["items"]
    for path in a.models:
        c = counts(ref, json.loads(Path(path).read_text())["results"][a.task]["items"], a.metric, a.choices)
        print(f"{path}: {c['differ']} of {c['items']} choices differ; only the reference right {c['reference_only_right']}, "
              f"only the model right {c['model_only_right']} (chance changes: {c['chance'][0]} and {c['chance'][1]})")


if __name__ == "__main__":
    main()
