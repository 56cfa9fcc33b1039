"""Scoring that survives an interruption: finished batches kept on disk, a restart scores only the rest.

An evaluation of a few thousand items takes tens of minutes on a CPU (an hour for a 0.5B model), and a
background job dies with its session. ``score(..., resume=folder)`` appends what it finished to
``folder`` every ``every`` seconds (and when interrupted by an exception): one small shard a save,
written atomically, so a kill loses at most the batches since the last one. A restart with the same
model, requests and settings (their hash, ``key.json``) loads the shards and skips the batches they
cover; anything else finds another key and starts afresh. Scoring does not depend on which batches
ran before (each forward stands alone), so a resumed evaluation equals an uninterrupted one. The
caller removes the folder once it has written the finished result.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from ..utils import atomic_write_bytes, log

ELAPSED = "elapsed.json"  # {"earlier": seconds of the passes before this one, "seconds": all so far}


def partial_key(model, requests, settings: dict, reference) -> str:
    """What a kept shard must match: the model's weights, the requests, the scoring settings and the
    reference (the answer-token KL depends on it)."""
    from ..load import fingerprint  # noqa: PLC0415
    from .refcache import ReferenceAnswers  # noqa: PLC0415

    h = hashlib.sha256()
    h.update(fingerprint(model).encode())
    for ctx, cont in requests:
        h.update(np.asarray(list(ctx), dtype=np.int64).tobytes())
        h.update(b"|")
        h.update(np.asarray(list(cont), dtype=np.int64).tobytes())
        h.update(b";")
    ref = None if reference is None else (reference.fingerprint if isinstance(reference, ReferenceAnswers)
                                          else fingerprint(reference))
    h.update(json.dumps({**settings, "reference": ref}, sort_keys=True, default=str).encode())
    return h.hexdigest()[:24]


class Partial:
    """The finished batches of one scoring pass, kept in ``folder`` as numbered shards."""

    def __init__(self, folder: str | Path, key: str, every: float = 60.0):
        self.folder, self.key, self.every = Path(folder), key, every
        self.pending: list[dict] = []
        self.last = self.started = time.monotonic()
        self.n_shards = 0
        self.earlier = 0.0  # seconds the earlier (interrupted) passes under this key spent scoring

    def load(self) -> list[dict]:
        """The shards kept under this key (none, and the folder cleared, when it holds another key's)."""
        kf = self.folder / "key.json"
        if self.folder.exists() and (not kf.exists() or json.loads(kf.read_text()).get("key") != self.key):
            log.info("%s holds a partial scoring of another model or request set: starting afresh", self.folder)
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        if not kf.exists():
            atomic_write_bytes(kf, json.dumps({"key": self.key}).encode())
        if (self.folder / ELAPSED).exists():
            self.earlier = float(json.loads((self.folder / ELAPSED).read_text()).get("seconds", 0.0))
        shards = []
        for p in sorted(self.folder.glob("shard-*.pt")):
            shards.append(torch.load(p, map_location="cpu", weights_only=True))
        self.n_shards = len(shards)
        if shards:
            log.info("%s: resuming a scoring pass, %d requests already scored",
                     self.folder, sum(len(s["ids"]) for s in shards))
        return shards

    def add(self, ids: torch.Tensor, ll: torch.Tensor, greedy: torch.Tensor, kl: torch.Tensor,
            hidden: list[torch.Tensor] | None) -> None:
        self.pending.append({"ids": ids.clone(), "ll": ll.clone(), "greedy": greedy.clone(), "kl": kl.clone(),
                             "hidden": hidden})
        if time.monotonic() - self.last >= self.every:
            self.flush()

    def flush(self) -> None:
        """Write what finished since the last save as one shard (and the time spent so far)."""
        self.last = time.monotonic()
        if self.folder.exists():  # what a resumed pass adds to its own time (earlier_seconds)
            atomic_write_bytes(self.folder / ELAPSED, json.dumps(
                {"earlier": self.earlier, "seconds": self.earlier + self.last - self.started}).encode())
        if not self.pending:
            return
        cat = {k: torch.cat([p[k] for p in self.pending]) for k in ("ids", "ll", "greedy", "kl")}
        cat["hidden"] = ([h for p in self.pending for h in p["hidden"]]
                         if self.pending[0]["hidden"] is not None else [])
        buf = io.BytesIO()
        torch.save(cat, buf)
        self.n_shards += 1
        atomic_write_bytes(self.folder / f"shard-{self.n_shards:05d}.pt", buf.getvalue())
        self.pending = []


def earlier_seconds(folder: str | Path) -> float:
    """Seconds that the earlier, interrupted passes of a finished scoring pass kept in ``folder`` spent
    (0 when it ran in one go): added to the last pass's own time, what the whole evaluation cost. An
    earlier pass counts from its scoring's start (after loading and tokenizing: a slight undercount)."""
    f = Path(folder) / ELAPSED
    return float(json.loads(f.read_text()).get("earlier", 0.0)) if f.exists() else 0.0


def partial_path(result: str | Path) -> Path:
    """Where an evaluation bound for the file ``result`` keeps its finished batches until it is written."""
    result = Path(result)
    return result.with_name(f".{result.stem}.partial")


def remove_partial(folder: str | Path) -> None:
    """Drop a finished scoring pass's shards (its result is written)."""
    shutil.rmtree(folder, ignore_errors=True)
