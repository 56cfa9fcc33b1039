"""tools/disagreements.py: which way accuracy counts the items whose choice differs from the reference's."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("disagreements", Path(__file__).parents[1] / "tools" / "disagreements.py")
dis = importlib.util.module_from_spec(spec)
spec.loader.exec_module(dis)


def test_counts_by_hand():
    # gold is choice 0 on every item; the reference is right on items 0-2, the model on 0, 3
    ref = {"pred_norm": "00012", "acc_norm": "11100"}  # as the evaluation JSONs keep them
    model = {"pred_norm": "03102", "acc_norm": "10010"}
    c = dis.counts(ref, model, "acc_norm", choices=4)
    assert (c["items"], c["differ"], c["reference_only_right"], c["model_only_right"]) == (5, 3, 2, 1)
    assert c["chance"] == (round(0.6 * 3, 1), round(0.4 * 3 / 3, 1))  # 1.8 lost, 0.4 won back by chance
    with pytest.raises(SystemExit, match="different items"):
        dis.counts(ref, {"pred_norm": "0", "acc_norm": "1"}, "acc_norm", 4)
