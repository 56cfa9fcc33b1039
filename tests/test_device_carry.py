"""tools/device_carry.py: payloads cut into small folders come back whole, one folder a call."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("device_carry", Path(__file__).parents[1] / "tools" / "device_carry.py")
dc = importlib.util.module_from_spec(spec)
spec.loader.exec_module(dc)


def _call(home: Path, carried: Path, folder: Path) -> None:
    """One device call: the checkout holds only this folder under .carry."""
    shutil.rmtree(carried, ignore_errors=True)
    shutil.copytree(folder, carried / folder.name)
    assert dc.main(["stash", "--carry", str(carried), "--home", str(home)]) == 0


def test_round_trip_one_folder_a_call(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RECOVER_LORA_CACHE", str(tmp_path / "cache"))
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(5000))
    small = tmp_path / "small.txt"
    small.write_bytes(b"hello")
    ed = tmp_path / "ed"
    for task, split in (("arc_easy", "validation"), ("arc_easy", "train"), ("piqa", "validation"), ("other", "x"),
                        ("mmlu/astronomy", "test"), ("mmlu/other_subject", "test")):  # MMLU: a folder a subject
        (ed / task).mkdir(parents=True, exist_ok=True)
        (ed / task / f"{split}.jsonl").write_text(json.dumps({"task": task, "split": split}) + "\n")
    out = tmp_path / "carry_here"
    assert dc.main(["prepare", "--file", str(big), "--file", str(small), "--eval-data", str(ed),
                    "--chunk-mib", str(2048 / 2**20), "--out", str(out)]) == 0
    folders = sorted(out.glob("p[0-9][0-9]"))
    assert len(folders) >= 3
    for f in folders:  # every folder within the chunk size (plus its small plan.json)
        assert sum(p.stat().st_size for p in f.iterdir() if p.name != "plan.json") <= 2048
    home, carried = tmp_path / "home", tmp_path / "device_checkout" / ".carry"
    # carry the folders in reverse order: nothing is assembled until its last piece arrives
    for f in reversed(folders[1:]):
        _call(home, carried, f)
    assert not (home / "files" / "big.bin").exists()
    assert "still to carry: p00" in capsys.readouterr().out
    _call(home, carried, folders[0])
    assert (home / "files" / "big.bin").read_bytes() == big.read_bytes()
    assert (home / "files" / "small.txt").read_bytes() == b"hello"
    # eval splits only (no train split unless asked), other tasks left out
    assert sorted(str(p.relative_to(home / "ed")) for p in (home / "ed").rglob("*.jsonl")) == \
        ["arc_easy/validation.jsonl", "mmlu/astronomy/test.jsonl", "piqa/validation.jsonl"]
    assert "3/3 payloads ready" in capsys.readouterr().out
    # idempotent: another call with any folder changes nothing
    _call(home, carried, folders[1])
    assert (home / "files" / "big.bin").read_bytes() == big.read_bytes()


def test_a_corrupt_piece_is_refused(tmp_path):
    f = tmp_path / "data.bin"
    f.write_bytes(os.urandom(3000))
    out = tmp_path / "c"
    dc.main(["prepare", "--file", str(f), "--chunk-mib", str(1024 / 2**20), "--out", str(out)])
    piece = next((out / "p01").glob("data.bin.*"))
    piece.write_bytes(b"x" * piece.stat().st_size)
    with pytest.raises(SystemExit, match="sha256 mismatch"):
        dc.main(["stash", "--carry", str(out), "--home", str(tmp_path / "home")])


def test_folder_size_follows_the_checkout(tmp_path):
    """A call carries 64 MiB with the checkout: folders are what is left of 62 MiB beside it."""
    import subprocess

    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / ".gitignore").write_text("ignored/\n")
    (tmp_path / "a.bin").write_bytes(b"x" * 3000)
    (tmp_path / "ignored").mkdir()
    (tmp_path / "ignored" / "big.bin").write_bytes(b"x" * 50000)  # ignored: does not travel
    assert dc.checkout_bytes(tmp_path) == 3000 + len("ignored/\n")
    assert dc.auto_chunk_mib(19 * 2**20) == 43.0 and dc.auto_chunk_mib(int(1.5 * 2**20)) == 60.0
    with pytest.raises(SystemExit, match="too little"):
        dc.auto_chunk_mib(59 * 2**20)
    # the heaviest folders two levels down, what to move aside before a lease
    (tmp_path / "results" / "cpu" / "x").mkdir(parents=True)
    (tmp_path / "results" / "cpu" / "x" / "r.json").write_bytes(b"x" * 7000)
    (tmp_path / "results" / "gpu").mkdir()
    (tmp_path / "results" / "gpu" / "r.json").write_bytes(b"x" * 5000)
    files = dc.checkout_files(tmp_path)
    assert dc.heaviest_folders(files) == [("results/cpu", 7000), ("results/gpu", 5000)]
    assert sum(files.values()) == dc.checkout_bytes(tmp_path) == 15000 + len("ignored/\n")
