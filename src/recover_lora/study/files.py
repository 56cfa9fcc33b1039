"""The small result files of a study folder: packed for the trip back from a device, mirrored into
the repository as each run finishes (so it can be committed), and brought back on a fresh checkout."""

from __future__ import annotations

import shutil
import tarfile
from pathlib import Path

from ..utils import RecoverLoraError, atomic_path, atomic_write_json, log, read_json, signals_deferred
from .config import Run, StudyConfig

# What RESULTS.md and a later session need from study_dir; models, adapters, data and checkpoints stay.
PACK_SUFFIXES = (".json", ".md", ".png", ".log", ".txt", ".yaml")
PACK_SKIP_DIRS = {"model", "adapter", "merged"}  # (tokenizer.json alone is 3.5 MB); data shards are .pt
MIRROR_MAX_BYTES = 4_000_000  # a larger file is not mirrored
EARLIER = "earlier"  # <run>/earlier/K/: what a run made before it was run again (set_aside)
KEPT_ON_AGAIN = {"diagnosis", "heldout", EARLIER}  # the same for a new attempt: its placement plan, held-out set


def _shared_data(parts: tuple[str, ...]) -> bool:
    """A shard of a model's shared synthetic pool (<model>/synth/) or held-out set (<model>/heldout-<tag>/):
    a few hundred KB at the CPU study's size, and what makes a run on a fresh machine comparable with the
    runs before it: the same tokens, where decoding them again on another CPU need not give them."""
    return len(parts) == 3 and (parts[1] == "synth" or parts[1].startswith("heldout-")) and parts[2].endswith(".safetensors")


def _small_files(root: Path, data: bool = False) -> list[Path]:
    """The result files under ``root``; with ``data`` the shared synthetic shards too (:func:`_shared_data`)."""
    return sorted(f for f in root.rglob("*") if f.is_file()
                  and (f.suffix in PACK_SUFFIXES or data and _shared_data(f.relative_to(root).parts))
                  and not PACK_SKIP_DIRS & set(f.relative_to(root).parts[:-1])
                  and not any(p.startswith(".") for p in f.relative_to(root).parts))  # (.partial folders: resume state)


def pack_results(study_dir: str | Path, archive: str | Path) -> int:
    """Write the small result files of ``study_dir`` (JSON, MD, PNG, logs) into one ``.tar.gz``:
    the GPU machine returns at most 8 files a call. Returns the number of files packed."""
    root = Path(study_dir)
    if not root.is_dir():
        raise RecoverLoraError(f"no study folder {root}")
    files = _small_files(root)
    Path(archive).parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w:gz") as tar:
        for f in files:
            tar.add(f, arcname=str(f.relative_to(root)))
    return len(files)


def unpack_results(archive: str | Path, study_dir: str | Path, mirror: str | Path | None = None) -> int:
    """Merge a :func:`pack_results` archive into ``study_dir`` (newer files win). Returns the count.
    A run set aside there (``study --again``: its ``earlier/K/`` is new here) is set aside here first, in
    ``study_dir`` and ``mirror``: an archive cannot carry the deletions, and a new attempt that was cut
    short must not come back beside the earlier attempt's done.json."""
    root = Path(study_dir)
    root.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = [m for m in tar.getmembers() if m.isfile()]
            for run, k in sorted(_set_aside_in(m.name for m in members)):
                if not (root / run / EARLIER / k).exists():
                    set_aside_folders([root / run] + ([Path(mirror) / run] if mirror else []), int(k))
            tar.extractall(root, members=members, filter="data")  # refuses absolute paths and '..'
    except (OSError, tarfile.TarError) as e:
        raise RecoverLoraError(f"cannot unpack {archive}: {e}") from None
    return len(members)


def _set_aside_in(names) -> set[tuple[Path, str]]:
    """(run folder, K) for each ``<run>/earlier/K/...`` among archive member ``names``."""
    out = set()
    for name in names:
        parts = Path(name).parts
        i = parts.index(EARLIER) if EARLIER in parts[:-2] else -1
        if i >= 0 and parts[i + 1].isdigit():
            out.add((Path(*parts[:i]), parts[i + 1]))
    return out


def _copy_small_files(src: Path, dest: Path, replace: bool) -> int:
    """Copy ``src``'s small result files missing in ``dest``; with ``replace`` changed ones too (to a size)."""
    n = 0
    for f in _small_files(src, data=True):
        t = dest / f.relative_to(src)
        if replace and f.stat().st_size > MIRROR_MAX_BYTES or t.exists() and (
                not replace or t.stat().st_size == f.stat().st_size and t.read_bytes() == f.read_bytes()):
            continue
        with atomic_path(t) as tmp:  # two workers mirror at once, and a worker may be stopped mid-copy
            shutil.copyfile(f, tmp)
        n += 1
    return n


def seed_from_mirror(cfg: StudyConfig) -> int:
    """On a fresh checkout (or machine), bring the mirrored result files back into the study folder
    before running, so that finished runs and cached evaluations are not redone. Files already in
    the study folder win. Returns the number of files copied."""
    if not cfg.mirror or not Path(cfg.mirror).is_dir():
        return 0
    n = _copy_small_files(Path(cfg.mirror), Path(cfg.study_dir), replace=False)
    if n:
        log.info("study: %d result files brought back from %s", n, cfg.mirror)
    return n


def mirror_results(cfg: StudyConfig) -> int:
    """Copy the small result files of the study folder (what :func:`pack_results` packs) to
    ``cfg.mirror``, a folder in the repository, so each finished piece can be committed at once.
    Returns the number of files copied (only new or changed ones)."""
    return _copy_small_files(Path(cfg.study_dir), Path(cfg.mirror), replace=True) if cfg.mirror else 0


def set_aside(cfg: StudyConfig, run: Run) -> int | None:
    """Run ``run`` again from its start (on this machine: its adapter stayed on one that is gone), its
    earlier result kept: all in its folder but what a new attempt shares with it (:data:`KEPT_ON_AGAIN`)
    moves to ``earlier/K/``, in the study folder and in the mirror alike (else the mirror would bring
    the earlier result back). Returns K, or None when there was nothing to set aside."""
    folders = [run.dir]
    if cfg.mirror:
        folders.append(Path(cfg.mirror) / run.dir.relative_to(cfg.study_dir))
    k = set_aside_folders(folders)
    if k is not None:
        log.info("study: %s set aside in %s/%d; it runs again from its start", run.name, EARLIER, k)
    return k


def set_aside_folders(folders: list[Path], k: int | None = None) -> int | None:
    """Move all in each of ``folders`` (one run's, in the study folder and the mirror) but
    :data:`KEPT_ON_AGAIN` to ``earlier/K/``; K the next free number unless given. None: nothing to move."""
    moving = {f: [x for x in f.iterdir() if x.name not in KEPT_ON_AGAIN] if f.is_dir() else [] for f in folders}
    if not any(moving.values()):
        return None
    k = k or 1 + max((int(x.name) for f in folders for x in (f / EARLIER).glob("*") if x.name.isdigit()), default=0)
    with signals_deferred():  # half moved (the mirror not), the next call would bring the earlier result back
        for f, items in moving.items():
            for x in items:
                (f / EARLIER / str(k)).mkdir(parents=True, exist_ok=True)
                shutil.move(x, f / EARLIER / str(k) / x.name)
            _keep_diagnosis_time(f / EARLIER / str(k) / "timing.json", f / "timing.json")
    return k


def _keep_diagnosis_time(earlier: Path, new: Path) -> None:
    """The diagnosis stays (:data:`KEPT_ON_AGAIN`) and the new attempt uses it: its time goes with it,
    out of what the earlier attempt lost."""
    t = read_json(earlier) if earlier.exists() else {}
    moved = {key: t.pop(key) for key in ("diagnose", "diagnose_cpu") if key in t}
    if moved:
        atomic_write_json(earlier, t)
        atomic_write_json(new, moved)
