"""The run folder of ``recover``: what it may hold, who holds it, and which run it belongs to.

Three promises, each checked before anything is written:
- ``--out-dir`` is empty, new, or a recover-lora run folder: a model folder (or anything else) is
  refused by name, never overwritten;
- one process at a time: a second run on the same folder stops at once (an OS file lock, gone
  when its holder dies, so a killed run leaves no stale lock);
- a run resumes only as itself: ``run.json`` records everything that determines the result
  (both models' fingerprints and dtype, the adapter plan, the method, the training, synthetic
  and held-out data settings); another model or setting is refused, naming what differs.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
from pathlib import Path
from typing import Any, Callable

import torch

from .synth import manifest
from .utils import RecoverLoraError, atomic_write_json, log, read_json

RUN_FILE = "run.json"
# Everything recover() and the study write into a run folder (hidden temp files aside).
RUN_ENTRIES = {RUN_FILE, "config.json", "report.json", "checkpoint.pt", "synth", "heldout", "diagnosis",
               "adapter", "adapter.gguf", "model", "merged", "eval", "loss.png", "budget.json", "timing.json", "done.json",
               "metrics.jsonl", "tensorboard",
               "earlier"}  # a study run's earlier attempt, set aside when it is run again (study --again)



def _is_run_config(path: Path) -> bool:
    try:
        d = read_json(path)
    except (OSError, ValueError):
        return False
    return isinstance(d, dict) and "degraded" in d and "distill" in d


def check_run_dir(out: str | Path) -> None:
    """Refuse an output folder that holds anything but a recover-lora run (nothing is written)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RecoverLoraError(f"--out {out} is a file, not a folder")
    if not out.is_dir():
        return
    names = {p.name for p in out.iterdir() if not p.name.startswith(".")}
    foreign = sorted(names - RUN_ENTRIES)
    if foreign:
        raise RecoverLoraError(f"--out {out} holds files that are not a recover-lora run ({', '.join(foreign[:5])}"
                               f"{', ...' if len(foreign) > 5 else ''}); refusing to write into it: "
                               "choose a new or empty folder")
    if "config.json" in names and RUN_FILE not in names and not _is_run_config(out / "config.json"):
        raise RecoverLoraError(f"--out {out} holds a config.json that is not a recover-lora run's (a model "
                               "folder?); refusing to overwrite it: choose a new or empty folder")


class RunLock:
    """An exclusive lock on a run folder for the life of the process that holds it."""

    def __init__(self, out: str | Path):
        self.path = Path(out) / ".lock"
        self.fd: int | None = None

    def __enter__(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise RecoverLoraError(f"{self.path.parent} is in use by another recover-lora process (pid {holder}); "
                                   "wait for it to finish or choose another --out-dir") from None
        except OSError as e:  # a file system without locks (NFS without lockd, Lustre without -o flock)
            if e.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP):
                os.close(fd)
                raise
            log.warning("%s: this file system has no file locks (%s); nothing stops a second run on this "
                        "folder", self.path.parent, e.strerror)
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd
        # Holding the lock, no writer is active here: temp files are what a killed run left behind.
        for tmp in self.path.parent.rglob(".*.tmp*"):
            if tmp.is_file():
                tmp.unlink()
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def run_identity(config: dict[str, Any], reference, degraded, data: str | None = None) -> dict[str, Any]:
    """What makes this run this run: ``config`` (its result-determining settings), both models and
    the given data folder's manifest."""
    ident = {"config": config, "reference_fingerprint": content_hash(reference),
             "degraded_fingerprint": content_hash(degraded), "dtype": str(next(degraded.parameters()).dtype)}
    if data:
        man = manifest(Path(data))
        ident["data_manifest"] = {k: man.get(k) for k in ("settings", "reference_fingerprint")}
    return ident


def content_hash(model) -> str:
    """sha256 of every weight, byte for byte: damage in a few entries (bit flips) changes it too."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for k in sorted(set(old) | set(new), key=str):
            out += _diff(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


def check_identity(out: str | Path, ident: dict[str, Any],
                   legacy: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> None:
    """Refuse to continue a run folder made by another run (other models or settings), by name.
    ``legacy`` maps the ``config.json`` of a run from before ``run.json`` to its config identity."""
    out = Path(out)
    old = None
    if (out / RUN_FILE).exists():
        try:
            old = read_json(out / RUN_FILE)["identity"]
        except (ValueError, KeyError, TypeError):
            raise RecoverLoraError(f"{out / RUN_FILE} is damaged; delete the folder to start over") from None
    elif legacy is not None and (out / "config.json").exists():  # before run.json: its config is all there is
        try:
            old = {"config": legacy(read_json(out / "config.json"))}
        except RecoverLoraError:
            old = None
    if old is None:
        return
    diffs = _diff(old, {k: ident.get(k) for k in old})
    if diffs:
        raise RecoverLoraError(f"{out} holds another run ({'; '.join(diffs[:6])}"
                               f"{'; ...' if len(diffs) > 6 else ''}); resume with the same models and settings, "
                               "or choose a new --out-dir")


def write_identity(out: str | Path, ident: dict[str, Any]) -> None:
    atomic_write_json(Path(out) / RUN_FILE, {"format": "recover-lora run", "version": 1, "identity": ident})
