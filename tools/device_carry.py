"""Move models, wheels and evaluation data to a GPU machine that has no network, in small calls.

The GPU machine (the ``device`` tool, ../shared/DEVICE.md) receives a copy of the checkout plus
ignored folders named in ``carry``, at most 64 MiB a call, and keeps what a call leaves under
$HOME while it stays warm. This script packs everything a run needs into folders of at most
``--chunk-mib`` MiB and puts the pieces back together on the other side:

    # here: pack (downloads the zoo wheels once), then carry .carry/p00, .carry/p01, ... one a call
    python tools/device_carry.py prepare smollm2 gemma3-270m --wheels --eval-data ../shared/eval-data
    # there, at the start of every call (idempotent; assembles whatever is complete, says what is missing)
    python tools/device_carry.py stash && export PYTHONPATH="$HOME/site:src" RECOVER_LORA_CACHE="$HOME/cache"

Payloads: zoo models (assembled into $RECOVER_LORA_CACHE/models/<name>/<file>, sha256-checked
against the zoo), Python wheels (installed with ``pip --no-index --no-deps --target $HOME/site``),
the evaluation data (a tar of <task>/<split>.jsonl, unpacked into $HOME/ed) and any ``--file``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

# the device lacks gguf and tyro (the CLI; + its two needs the image lacks); its transformers 5.17 misreads Gemma-3
DEFAULT_WHEELS = ("gguf==0.19.0", "transformers==5.23.0", "tyro==1.0.17", "docstring-parser==0.18.0",
                  "typeguard==4.6.1")
EVAL_TASKS = ("arc_easy", "arc_challenge", "hellaswag", "winogrande", "piqa", "openbookqa", "boolq",
              "mmlu_philosophy", "mmlu_management", "mmlu_astronomy")


from recover_lora.zoo import sha256_file as _sha256  # noqa: E402 (after the sys.path line)


def _eval_tar(src: Path, dest: Path, train: bool) -> Path:
    """A reproducible tar of <task>/<split>.jsonl (eval splits; train splits too with ``train``)."""
    # <task>/<split>.jsonl, and MMLU's subjects one folder down (mmlu/<subject>/<split>.jsonl)
    members = sorted(p for p in [*src.glob("*/*.jsonl"), *src.glob("mmlu/*/*.jsonl")]
                     if (p.parent.name in EVAL_TASKS or f"mmlu_{p.parent.name}" in EVAL_TASKS)
                     and (train or p.stem != "train"))
    if not members:
        raise SystemExit(f"no <task>/<split>.jsonl files under {src}")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=6) as tar:
        for p in members:
            info = tar.gettarinfo(str(p), arcname=str(p.relative_to(src)))
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            with open(p, "rb") as f:
                tar.addfile(info, f)
    dest.write_bytes(buf.getvalue())
    return dest


def checkout_files(root: Path = ROOT) -> dict[str, int]:
    """What a device call sends besides the carried folders, name -> bytes: tracked files and untracked
    ones git does not ignore (the device tool's rule; a tracked file moved away does not travel)."""
    names = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           check=True, capture_output=True).stdout.split(b"\0")
    return {n.decode(): (root / n.decode()).stat().st_size for n in names if n and (root / n.decode()).is_file()}


def checkout_bytes(root: Path = ROOT) -> int:
    return sum(checkout_files(root).values())


def heaviest_folders(files: dict[str, int], depth: int = 2, top: int = 3) -> list[tuple[str, int]]:
    """The folders (``depth`` levels down) that weigh most in a checkout: what to move aside for a lease."""
    sizes: dict[str, int] = {}
    for name, size in files.items():
        parts = name.split("/")
        if len(parts) > depth:
            key = "/".join(parts[:depth])
            sizes[key] = sizes.get(key, 0) + size
    return sorted(sizes.items(), key=lambda kv: -kv[1])[:top]


def auto_chunk_mib(tree: int, limit_mib: float = 62.0) -> float:
    """The largest folder that travels beside a checkout of ``tree`` bytes within ``limit_mib``."""
    left = limit_mib - tree / 2**20
    if left < 4:
        raise SystemExit(f"the checkout is {tree / 2**20:.1f} MiB: too little of a call's 64 MiB is left to carry")
    return float(int(left))


def prepare(a: argparse.Namespace) -> int:
    out = Path(a.out)
    if a.chunk_mib is None:
        files = checkout_files()
        tree = sum(files.values())
        a.chunk_mib = auto_chunk_mib(tree)
        print(f"checkout {tree / 2**20:.1f} MiB: folders of <= {a.chunk_mib:.0f} MiB")
        heavy = [(n, b) for n, b in heaviest_folders(files) if b > 4 * 2**20]
        if heavy:  # every call sends the checkout: what the device does not need costs calls (device time)
            print("  the checkout travels with every call; its heaviest folders (move aside those the device "
                  "does not need, mv and back after the lease, for fewer calls): "
                  + ", ".join(f"{n} {b / 2**20:.1f} MiB" for n, b in heavy))
    chunk = int(a.chunk_mib * 2**20)
    payloads: list[dict] = []  # {name, kind, path, dest?}
    staging = out / "_staging"
    staging.mkdir(parents=True, exist_ok=True)
    if a.wheels:
        wd = staging / "wheels"
        wd.mkdir(exist_ok=True)
        reqs = list(a.wheel) or list(DEFAULT_WHEELS)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        "--python-version", a.python_version, "-d", str(wd), *reqs], check=True)
        payloads += [{"name": w.name, "kind": "wheel", "path": w} for w in sorted(wd.glob("*.whl"))]
    if a.eval_data:
        tar = _eval_tar(Path(a.eval_data), staging / "eval-data.tar.gz", a.train_splits)
        payloads.append({"name": tar.name, "kind": "evaldata", "path": tar})
    for name in a.models:
        from recover_lora import zoo

        m = zoo.lookup(name)
        payloads.append({"name": f"{m.name}__{m.filename}", "kind": "model", "path": zoo.fetch(m.name),
                         "model": m.name, "filename": m.filename, "sha256": m.sha256})
    for f in a.file:
        payloads.append({"name": Path(f).name, "kind": "file", "path": Path(f)})
    if not payloads:
        raise SystemExit("nothing to carry: name models, --wheels, --eval-data or --file")

    for old in out.glob("p[0-9][0-9]"):
        shutil.rmtree(old)
    folders: list[list[tuple[str, int]]] = [[]]  # per folder: (piece name, bytes)
    free = chunk
    plan: dict = {"payloads": {}, "folders": {}}
    for p in payloads:
        size = p["path"].stat().st_size
        pieces, offset, k = [], 0, 0
        while offset < size or (size == 0 and k == 0):
            if free == 0:
                folders.append([])
                free = chunk
            n = min(free, size - offset)
            piece = f"{p['name']}.{k:03d}"
            folders[-1].append((piece, n))
            pieces.append(piece)
            free -= n
            offset += n
            k += 1
            if size == 0:
                break
        entry = {k2: v for k2, v in p.items() if k2 != "path"}
        entry.update(size=size, pieces=pieces, sha256=p.get("sha256") or _sha256(p["path"]))
        plan["payloads"][p["name"]] = entry
    # write the pieces
    sources = {p["name"]: p["path"] for p in payloads}
    handles = {}
    for i, folder in enumerate(folders):
        d = out / f"p{i:02d}"
        d.mkdir(parents=True, exist_ok=True)
        plan["folders"][d.name] = [name for name, _ in folder]
        for piece, n in folder:
            src = piece.rsplit(".", 1)[0]
            fh = handles.get(src) or handles.setdefault(src, open(sources[src], "rb"))
            (d / piece).write_bytes(fh.read(n))
    for fh in handles.values():
        fh.close()
    for i in range(len(folders)):  # the plan travels with every folder
        (out / f"p{i:02d}" / "plan.json").write_text(json.dumps(plan, indent=1))
    shutil.rmtree(staging, ignore_errors=True)
    total = sum(e["size"] for e in plan["payloads"].values())
    print(f"{len(plan['payloads'])} payloads, {total / 2**20:.1f} MiB in {len(folders)} folders of "
          f"<= {a.chunk_mib} MiB; carry one a call, in any order:")
    for name, pieces in plan["folders"].items():
        print(f"  {out / name}   ({', '.join(sorted({p.rsplit('.', 1)[0] for p in pieces}))})")
    print("start each device command with:  python tools/device_carry.py stash && "
          "export PYTHONPATH=\"$HOME/site:src\" RECOVER_LORA_CACHE=\"$HOME/cache\"")
    return 0


def stash(a: argparse.Namespace) -> int:
    home = Path(a.home or os.environ.get("HOME", "."))
    store = home / "stash"
    store.mkdir(parents=True, exist_ok=True)
    carried = Path(a.carry)
    plan = None
    for d in sorted(carried.glob("p[0-9][0-9]")):
        for f in d.iterdir():
            if f.name == "plan.json":
                plan = json.loads(f.read_text())
                continue
            dst = store / f.name
            if not dst.exists() or dst.stat().st_size != f.stat().st_size:
                shutil.copyfile(f, dst)
    if plan is not None:
        (store / "plan.json").write_text(json.dumps(plan))
    elif (store / "plan.json").exists():
        plan = json.loads((store / "plan.json").read_text())
    else:
        print("device_carry: no plan.json carried yet")
        return 1
    cache = Path(os.environ.get("RECOVER_LORA_CACHE", home / "cache"))
    missing_folders: set[str] = set()
    for name, e in plan["payloads"].items():
        done = store / f"{name}.done"
        if done.exists():
            continue
        lacking = [p for p in e["pieces"] if not (store / p).exists()]
        if lacking:
            missing_folders |= {f for f, ps in plan["folders"].items() if set(ps) & set(lacking)}
            continue
        whole = store / name
        with open(whole, "wb") as out:
            for p in e["pieces"]:
                with open(store / p, "rb") as src:
                    shutil.copyfileobj(src, out, 1 << 22)
        if _sha256(whole) != e["sha256"]:
            whole.unlink()
            raise SystemExit(f"device_carry: {name} sha256 mismatch after assembly")
        if e["kind"] == "model":
            target = cache / "models" / e["model"] / e["filename"]
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(whole, target)
            where = target
        elif e["kind"] == "wheel":
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                            "--target", str(home / "site"), str(whole)], check=True)
            where = home / "site"
        elif e["kind"] == "evaldata":
            with tarfile.open(whole) as tar:
                tar.extractall(home / "ed", filter="data")
            where = home / "ed"
        else:
            target = home / "files" / name
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(whole, target)
            where = target
        for p in e["pieces"]:
            (store / p).unlink(missing_ok=True)
        done.write_text(str(where))
        print(f"device_carry: {name} -> {where}")
    ready = [n for n in plan["payloads"] if (store / f"{n}.done").exists()]
    print(f"device_carry: {len(ready)}/{len(plan['payloads'])} payloads ready"
          + (f"; still to carry: {', '.join(sorted(missing_folders))}" if missing_folders else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.strip().split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pr = sub.add_parser("prepare", help="pack payloads into .carry/pNN folders (here)")
    pr.add_argument("models", nargs="*", help="zoo models (smollm2, gemma3-270m, qwen2.5-coder-0.5b, ...)")
    pr.add_argument("--wheels", action="store_true", help=f"add wheels (default {', '.join(DEFAULT_WHEELS)})")
    pr.add_argument("--wheel", action="append", default=[], help="a pip requirement to carry instead")
    pr.add_argument("--python-version", default="3.12", help="the device's Python, for pip download")
    pr.add_argument("--eval-data", default=None, help="folder with <task>/<split>.jsonl")
    pr.add_argument("--train-splits", action="store_true", help="also the train splits (sft-lora)")
    pr.add_argument("--file", action="append", default=[], help="any other file (lands in $HOME/files)")
    # a call carries 64 MiB in all, the checkout included (19 MB on 2026-12-04, and growing with the
    # committed results): by default a folder is what is left of 62 MiB beside the checkout
    pr.add_argument("--chunk-mib", type=float, default=None, help="folder size (default: 62 MiB - the checkout)")
    pr.add_argument("--out", default=str(ROOT / ".carry"))
    pr.set_defaults(func=prepare)
    st = sub.add_parser("stash", help="collect the carried pieces and assemble what is complete (there)")
    st.add_argument("--carry", default=str(ROOT / ".carry"))
    st.add_argument("--home", default=None, help="default $HOME")
    st.set_defaults(func=stash)
    a = p.parse_args(argv)
    return a.func(a)


if __name__ == "__main__":
    sys.exit(main())
