"""tools/paired_agreement.py: the agreement difference of two models, paired over the same items."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("paired_agreement",
                                              Path(__file__).parents[1] / "tools" / "paired_agreement.py")
pa = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pa)


def _task(preds: str) -> dict:
    return {"acc": 0.5, "n": len(preds), "items": {"pred": preds, "acc": "0" * len(preds)}}


def test_differences_by_hand_and_the_average_without_some_tasks():
    ref = {"x": _task("0123"), "y": _task("0000")}
    a = {"x": _task("0120"), "y": _task("0000")}  # x: 3 of 4 agree; y: 4 of 4
    b = {"x": _task("1111"), "y": _task("0001")}  # x: 1 of 4 (item 1); y: 3 of 4
    rows = pa.paired(ref, a, b, n_boot=500)
    assert rows["x"][0] == pytest.approx(0.75 - 0.25) and rows["y"][0] == pytest.approx(1.0 - 0.75)
    m, ci = pa.average(rows, ["x", "y"])
    assert m == pytest.approx((0.5 + 0.25) / 2) and ci[0] <= m <= ci[1]  # tasks weigh alike
    assert pa.average(rows, ["y"])[0] == pytest.approx(0.25)
    b["y"] = _task("000")
    with pytest.raises(SystemExit, match="same items"):
        pa.paired(ref, a, b)
