"""Does training undo a warm start? Per run, the 10-step mean of the training loss against its first
10 steps': the peak ratio (and its step), the last 10 steps' ratio, and the first step where the mean
passes ``--rise`` x the first 10 steps' (none: it never does): the test ``--distill.rewind-rise``
applies while training (training/state.py, loss_rise), here read back from finished runs.

    .venv/bin/python tools/loss_rise.py runs/study-cpu/*/*/*/ --rise 1.2

Reads each folder's report.json (its loss curve), else the metrics.jsonl of a run still training.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from recover_lora.training.state import RISE_WINDOW as K, loss_rise  # the guard's own test


def losses(folder: Path) -> list[float] | None:
    if (folder / "report.json").exists():
        return [h["loss"] for h in json.loads((folder / "report.json").read_text()).get("loss_curve") or []]
    if (folder / "metrics.jsonl").exists():
        rows = (json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip())
        return [r["loss"] for r in rows if r.get("kind") == "train"]
    return None


def rise(loss: list[float], threshold: float) -> dict:
    """Peak and last 10-step means over the first 10 steps' mean, and the first step past ``threshold``."""
    x = np.asarray(loss, dtype=float)
    mean = np.convolve(x, np.ones(K) / K, mode="valid")  # mean[i]: steps i+1 .. i+K
    ref = mean[0]
    hist = [{"loss": v} for v in loss]
    past = [s for s in range(2 * K, len(x) + 1) if (loss_rise(hist[:s]) or 0) > threshold]
    return {"steps": len(x), "first": ref, "peak": mean.max() / ref, "peak_step": int(mean.argmax()) + K,
            "last": mean[-1] / ref, "passes_at": past[0] if past else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.strip().split("\n")[0])
    p.add_argument("folders", nargs="+")
    p.add_argument("--rise", type=float, default=1.2)
    a = p.parse_args()
    print(f"| run | steps | loss, first {K} | peak / first (step) | last {K} / first | passes {a.rise}x at |")
    print("|---|---:|---:|---:|---:|---:|")
    for f in map(Path, a.folders):
        loss = losses(f)
        if not loss or len(loss) < 3 * K:
            continue
        r = rise(loss, a.rise)
        print(f"| {f} | {r['steps']} | {r['first']:.3f} | {r['peak']:.2f} ({r['peak_step']}) | {r['last']:.2f} | "
              f"{r['passes_at'] or '-'} |")


if __name__ == "__main__":
    main()
