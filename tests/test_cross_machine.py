"""tools/cross_machine.py: a row's agreement against the kept reference and against the one made again."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import yaml

spec = importlib.util.spec_from_file_location("cross_machine", Path(__file__).parents[1] / "tools" / "cross_machine.py")
cm = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cm)


def _res(pred: str) -> dict:
    return {"arc_easy": {"acc": 0.5, "n": len(pred), "items": {"pred": pred, "acc": "1" * len(pred)}}}


def test_agreement_both_ways_by_hand(tmp_path, monkeypatch, capsys):
    # kept reference "0123", made again "0133" (item 3 differs); the row chose "0133": 3/4 against the
    # kept choices, 4/4 against the new ones. The recheck holds more items than the measures: cut to 4.
    (tmp_path / "study.yaml").write_text(yaml.safe_dump({"study_dir": "s", "models": {"m": "x"},
                                                         "eval": {"tasks": ["arc_easy"]}}))
    ev = tmp_path / "s/m/eval"
    ev.mkdir(parents=True)
    (ev / "reference.json").write_text(json.dumps({"results": _res("0123")}))
    (ev / "reference-accuracy-recheck.json").write_text(json.dumps([{
        "when": "now", "cpu": "X", "seconds": 1.0,
        "tasks": {"arc_easy": {"n": 6, "same_pred": 5 / 6, "items_now": {"pred": "013301"}}}}]))
    run = tmp_path / "s/m/d/kv"
    (run / "eval").mkdir(parents=True)
    (run / "done.json").write_text(json.dumps({"damage": "d", "method": "kv", "cpu": "X"}))
    (run / "eval/recovered.json").write_text(json.dumps({"results": _res("0133")}))
    monkeypatch.setattr(sys, "argv", ["cross_machine.py", str(tmp_path / "study.yaml"), "m"])
    cm.main()
    assert "| d/kv | X | 75.0% | 100.0% |" in capsys.readouterr().out
