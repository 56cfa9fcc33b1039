"""Re-draw a finished run's loss.png from its report.json (after a change to how it is drawn).

    python tools/replot_loss.py runs/study-cpu/*/*/*/          # each folder that holds a report.json

The figures only: no number a run reports changes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from recover_lora.recover import plot_training


def main(folders: list[str]) -> None:
    for f in map(Path, folders):
        if not (f / "report.json").exists():
            continue
        r = json.loads((f / "report.json").read_text())
        h = r["heldout"]
        kept = (r.get("warm_start_check") or {}).get("kept") == "warm start"
        plot_training(r.get("loss_curve") or [], r.get("heldout_curve") or [], h["before"], h["after"],
                      f / "loss.png", start=h.get("init"), kept_start=kept)
        print(f / "loss.png")


if __name__ == "__main__":
    main(sys.argv[1:])
