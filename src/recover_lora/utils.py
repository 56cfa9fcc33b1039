"""Small helpers shared by every stage: devices, seeding, atomic writes, logging."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import signal
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from .errors import RecoverLoraError  # noqa: E402,F401 - re-exported (its home imports nothing)

log = logging.getLogger("recover_lora")




def resolve_device(device: str | None = "auto") -> torch.device:
    """'auto' picks CUDA when present, else CPU; a bad or absent device is refused by name."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise RecoverLoraError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0 or (dev.index is not None and dev.index >= n):
            raise RecoverLoraError(f"device {device!r} is not available here ({n} CUDA devices); use cpu or auto")
    elif dev.type != "cpu" and dev.type != "mps":
        raise RecoverLoraError(f"device type {dev.type!r} is not supported; use auto, cpu or cuda")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device | None = None) -> torch.dtype:
    """'auto' means bf16 on GPU (fast, and what the paper-scale runs use) and fp32 on CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device is not None and device.type == "cuda" else torch.float32
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise RecoverLoraError(f"unknown dtype {dtype!r}; use one of {sorted(names)} or 'auto'")
    return names[dtype]


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Inside the block SIGTERM (preemption, ``kill``, ``timeout``) raises KeyboardInterrupt, like Ctrl-C.

    Python's default SIGTERM action ends the process on the spot: no ``finally`` runs and nothing
    is said. As a KeyboardInterrupt the caller can clean up and say where it stopped. Handlers can
    only be set in the main thread; elsewhere this does nothing. The previous handler comes back.
    """
    main = threading.current_thread() is threading.main_thread()
    prev = signal.signal(signal.SIGTERM, _raise_interrupt) if main else None
    try:
        yield
    finally:
        if main:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if prev is None else prev)  # None: set outside Python


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Inside the block Ctrl-C and SIGTERM wait: a few moves that must happen all or none (files
    set aside in two folders) finish first, and the first such signal is raised again after. Main
    thread only (elsewhere this does nothing), as :func:`sigterm_as_interrupt`."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []
    prev = {s: signal.signal(s, lambda n, _f: got.append(n)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in prev.items():
            signal.signal(s, signal.SIG_DFL if h is None else h)
        if got:
            signal.raise_signal(got[0])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()  # what open() would give: mkstemp's 0600 would hide results from others


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a unique temp path beside ``path``; on success it replaces ``path``, on any failure
    (full disk, Ctrl-C) it is removed. A reader never sees half a file, and two writers never
    share a temp file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    try:
        yield Path(tmp)
        fd = os.open(tmp, os.O_RDONLY)  # on disk before the rename: a power cut leaves no empty file
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`), flushed to disk."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def json_safe(obj: Any) -> Any:
    """NaN and Inf as null: bare ``NaN`` is not JSON, and other tools refuse such files."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def atomic_write_json(path: str | Path, obj: Any) -> None:
    text = json.dumps(json_safe(obj), indent=2, sort_keys=False, default=str, allow_nan=False)
    atomic_write_bytes(path, (text + "\n").encode())


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def read_json(path: str | Path) -> Any:
    with open(path) as f:
        return json.load(f)


def save_figure(fig, path: str | Path, dpi: int = 120) -> Path:
    """Write a matplotlib figure atomically (a reader never sees half a PNG) and close it."""
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi)
    finally:
        plt.close(fig)
    return Path(path)


def strip_gguf_quant_config(model) -> None:
    """Drop the stale "quantized" markers transformers leaves on a GGUF-loaded (dequantized) model."""
    # transformers marks GGUF-loaded models as "quantized" and refuses save_pretrained, yet the
    # weights are already dequantized dense tensors: the marker is only a stale label.
    for obj in (model.config, model):
        if hasattr(obj, "quantization_config"):
            try:
                delattr(obj, "quantization_config")
            except AttributeError:
                pass
    for attr in ("hf_quantizer", "is_quantized"):
        if hasattr(model, attr):
            try:
                setattr(model, attr, None if attr == "hf_quantizer" else False)
            except AttributeError:
                pass
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
