"""Each method and warm start trains bit for bit the adapter it trained before a redesign (issue 15):
the fingerprints in golden_adapters.json were made by the code before the config/CLI redesign
(ff0086c) and are recomputed here. Float results depend on the CPU's kernels (its vector instructions:
AVX512 and AVX2 EPYCs train different bits), so the exact check runs on the machines they were made on,
one entry each (this project's CPU machines and CI); elsewhere it says so."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from golden import compute

GOLDEN = json.loads((Path(__file__).parent / "golden_adapters.json").read_text())


def _cpu() -> str:
    try:
        return next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        return "?"


def test_every_method_trains_the_same_adapter_bit_for_bit():
    here = {"cpu": _cpu(), "capability": torch.backends.cpu.get_cpu_capability(),
            "torch": torch.__version__.split("+")[0]}
    m = next((m for m in GOLDEN["machines"] if all(m[k] == v for k, v in here.items())), None)
    if m is None:
        pytest.skip(f"fingerprints made on {[{k: m[k] for k in here} for m in GOLDEN['machines']]}; this is {here}: "
                    "rerun `python tests/golden.py` on the old code here to compare")
    got = compute()
    assert set(got) == set(m["fingerprints"])
    differ = [k for k in got if got[k] != m["fingerprints"][k]]
    assert not differ, f"trains other weights than before: {differ}"
