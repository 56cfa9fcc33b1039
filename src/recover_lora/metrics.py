"""Training metrics as they happen: JSON lines (``metrics.jsonl``), and TensorBoard when installed.

A run's numbers were only in the progress bar until ``report.json`` at the end. Every optimizer
step now appends one line ``{"kind": "train", "step", "loss", "top1", "lr", "tokens", "time"}``
(and ``"kind": "heldout"`` lines when the held-out set is measured), flushed at once, so that
``tail -f``, pandas (``pd.read_json(path, lines=True)``) or a plotting script can watch a run; with
the ``tensorboard`` package installed the same scalars go to ``<run>/tensorboard``. A resumed run
first drops what was logged after its checkpoint, so the file reads as one uninterrupted run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .utils import atomic_write_bytes, log


class MetricsLog:
    """Append-only metrics of one training run (rank 0 only writes)."""

    def __init__(self, path: str | Path, tensorboard_dir: str | Path | None = None, enabled: bool = True):
        self.path = Path(path)
        self.tb_dir = Path(tensorboard_dir) if tensorboard_dir else None
        self.enabled = enabled
        self._tb = None
        self._tb_tried = False
        self._start = 0

    def resume(self, step: int) -> None:
        """The run continues after ``step`` (its checkpoint): forget what was logged later."""
        self._start = step
        if not self.enabled or not self.path.exists():
            return
        # a run's final measurement ("final": true) is made again at its end
        kept = [ln for ln in self.path.read_text().splitlines() if ln.strip() and _step(ln) <= step
                and '"final": true' not in ln]
        atomic_write_bytes(self.path, "".join(ln + "\n" for ln in kept).encode())

    def log(self, kind: str, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps({"kind": kind, **record}) + "\n")
        tb = self._writer()
        if tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    tb.add_scalar(f"{kind}/{k}", v, record["step"])
            tb.flush()

    def _writer(self):
        if self._tb_tried or self.tb_dir is None:
            return self._tb
        self._tb_tried = True
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415 - needs the tensorboard package
        except ImportError:
            log.debug("tensorboard is not installed: metrics go to %s only", self.path)
            return None
        # purge_step: a resumed run overwrites the steps it redoes instead of doubling them
        self._tb = SummaryWriter(str(self.tb_dir), purge_step=self._start + 1 if self._start else None)
        return self._tb

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _step(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return 1 << 62  # a torn last line: dropped


def read_metrics(path: str | Path, kind: str | None = None) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (of one ``kind``)."""
    out = []
    for ln in Path(path).read_text().splitlines():
        if ln.strip():
            r = json.loads(ln)
            if kind is None or r.get("kind") == kind:
                out.append(r)
    return out
