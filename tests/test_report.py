"""Recovery report: gap-closed arithmetic, paired bootstrap CIs and the written files, on hand-made results."""

from __future__ import annotations

import json

import numpy as np
import pytest

from recover_lora.report import ReportConfig, build_report, compute_report, gap_closed, to_markdown
from recover_lora.utils import RecoverLoraError


def _res(acc_items, norm_items=None):
    r = {"acc": float(np.mean(acc_items)), "n": len(acc_items), "items": {"acc": list(acc_items)}}
    if norm_items is not None:
        r["acc_norm"] = float(np.mean(norm_items))
        r["items"]["acc_norm"] = list(norm_items)
    return r


# task a: reference 80%, degraded 40%, recovered 70% -> drop 40 pts, recovered 30 pts, gap closed 75%
REF = {"a": _res([1] * 8 + [0] * 2), "b": _res([1] * 5 + [0] * 5, [1] * 6 + [0] * 4)}
DEG = {"a": _res([1] * 4 + [0] * 6), "b": _res([1] * 5 + [0] * 5, [1] * 2 + [0] * 8)}
REC = {"a": _res([1] * 7 + [0] * 3), "b": _res([1] * 5 + [0] * 5, [1] * 5 + [0] * 5)}


def test_gap_closed_arithmetic():
    assert gap_closed(0.8, 0.4, 0.7) == pytest.approx(0.75)
    assert gap_closed(0.5, 0.5, 0.6) is None
    rep = compute_report(REF, DEG, REC, ReportConfig(n_boot=200))
    a, b = rep["tasks"]["a"], rep["tasks"]["b"]
    assert a["metric"] == "acc" and b["metric"] == "acc_norm"  # acc_norm where the task defines it
    assert (a["reference"], a["degraded"], a["recovered"]) == pytest.approx((80, 40, 70))
    assert a["drop"] == pytest.approx(40) and a["recovered_points"] == pytest.approx(30)
    assert a["gap_closed"] == pytest.approx(0.75)
    assert b["drop"] == pytest.approx(40) and b["gap_closed"] == pytest.approx(0.75)
    avg = rep["average"]  # unweighted mean over tasks: ref 70, deg 30, rec 60
    assert (avg["reference"], avg["degraded"], avg["recovered"]) == pytest.approx((70, 30, 60))
    assert avg["gap_closed"] == pytest.approx(0.75)
    assert compute_report(REF, DEG, REC, ReportConfig(metric="acc", n_boot=50))["tasks"]["b"]["gap_closed"] is None


def test_paired_bootstrap_ci_is_seeded_and_brackets_the_estimate():
    g = np.random.default_rng(1)
    ref = g.random(400) < 0.7
    deg = ref & (g.random(400) < 0.6)
    rec = ref & (g.random(400) < 0.9)
    runs = [{"t": _res(x.astype(int).tolist())} for x in (ref, deg, rec)]
    r1 = compute_report(*runs, ReportConfig(n_boot=500, seed=3))
    r2 = compute_report(*runs, ReportConfig(n_boot=500, seed=3))
    assert r1 == r2
    t = r1["tasks"]["t"]
    for k in ("reference", "degraded", "recovered", "drop", "recovered_points", "gap_closed"):
        lo, hi = t["ci"][k]
        assert lo <= t[k] <= hi, k
    # pairing: every degraded-correct item is reference-correct, so the drop CI excludes 0 and is
    # narrower than an unpaired one would be (sd of the difference < sum of the sds).
    assert t["ci"]["drop"][0] > 0
    n = 400
    p_ref, p_deg = ref.mean(), deg.mean()
    unpaired_half = 1.96 * 100 * np.sqrt(p_ref * (1 - p_ref) / n + p_deg * (1 - p_deg) / n)
    assert (t["ci"]["drop"][1] - t["ci"]["drop"][0]) / 2 < unpaired_half
    # a 0/1 item count gives a CI of roughly +-1.96 * sqrt(p(1-p)/n)
    half = (t["ci"]["reference"][1] - t["ci"]["reference"][0]) / 2
    assert half == pytest.approx(1.96 * 100 * np.sqrt(p_ref * (1 - p_ref) / n), rel=0.2)


def test_build_report_writes_markdown_json_png(tmp_path):
    doc = {"model": "m", "results": REF}  # an `eval --out` file is accepted as well
    (tmp_path / "ref.json").write_text(json.dumps(doc))
    rep = build_report(tmp_path / "ref.json", DEG, REC, tmp_path / "out", ReportConfig(n_boot=100))
    png = (tmp_path / "out" / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| a | acc | 10 | 80.0 [" in md and "75.0%" in md and "**average**" in md
    assert md == rep["markdown"] == to_markdown(rep)
    data = json.loads((tmp_path / "out" / "report.json").read_text())
    assert data["tasks"]["a"]["gap_closed"] == pytest.approx(0.75)


def test_report_errors():
    with pytest.raises(RecoverLoraError, match="no task was evaluated on all three"):
        compute_report(REF, {"c": REF["a"]}, REC)
    with pytest.raises(RecoverLoraError, match="different numbers of items"):
        compute_report(REF, {**DEG, "a": _res([1, 0])}, REC)


def test_resolved_average_leaves_out_tasks_whose_gap_is_noise():
    """Only tasks whose reference - degraded CI excludes zero enter the resolved average."""
    def res(a, b):
        return {"big": {"acc": a / 400, "n": 400, "items": {"acc": [1] * a + [0] * (400 - a)}},
                "tiny": {"acc": b / 400, "n": 400, "items": {"acc": [1] * b + [0] * (400 - b)}}}

    rep = compute_report(res(300, 200), res(200, 199), res(290, 230))
    assert rep["tasks"]["big"]["resolved"] and not rep["tasks"]["tiny"]["resolved"]
    assert rep["unresolved"] == ["tiny"] and rep["resolved_average"]["tasks"] == ["big"]
    assert rep["resolved_average"]["gap_closed"] == pytest.approx(0.9)  # (290-200)/(300-200), "tiny" not in it
    lo, hi = rep["resolved_average"]["ci"]["gap_closed"]
    assert lo < 0.9 < hi


def test_gap_closed_counts_the_distance_to_the_reference_either_side():
    """A damage that lifts a task above the reference (BoolQ under noise): moving it back down is
    repair, not harm. Hand-computed: "up" ref 300, deg 200, rep 280 (closes 80 of 100 points);
    "down" ref 100, deg 300, rep 200 (closes 100 of 200): (80 + 100) / (100 + 200) = 60%, 22.5
    accuracy points a task on average; averaging accuracies first would say (240 - 250) / (200 - 250) = 20%."""
    def res(a, b):
        return {"up": {"acc": a / 400, "n": 400, "items": {"acc": [1] * a + [0] * (400 - a)}},
                "down": {"acc": b / 400, "n": 400, "items": {"acc": [1] * b + [0] * (400 - b)}}}

    rep = compute_report(res(300, 100), res(200, 300), res(280, 200))
    avg = rep["resolved_average"]
    assert avg["tasks"] == ["up", "down"] and avg["gap_closed"] == pytest.approx(0.6)
    assert avg["points_closed"] == pytest.approx((20 + 25) / 2)  # accuracy points closed, mean over the tasks
    lo, hi = avg["ci"]["gap_closed"]
    assert lo < 0.6 < hi
    down = rep["tasks"]["down"]
    assert down["distance_closed"] == pytest.approx(25.0) and down["ci"]["distance_closed"][0] > 0  # not worse
    assert down["recovered_points"] == pytest.approx(-25.0)  # what the old check called a loss


def test_agreement_and_answer_kl_by_hand():
    from recover_lora.report import compute_measures

    ref = {"arc_easy": {"acc": 0.5, "acc_norm": 0.5, "n": 4, "items": {"pred": [0, 1, 2, 3], "pred_norm": [0, 1, 2, 3]}},
           "boolq": {"acc": 0.5, "n": 2, "items": {"pred": [0, 1], "pred_norm": [0, 0]}}}
    mod = {"arc_easy": {"acc": 0.5, "acc_norm": 0.5, "n": 4,
                        "items": {"pred": [0, 0, 0, 0], "pred_norm": "0123", "answer_kl": [0.1, 0.2, 0.3, 0.4]}},
           "boolq": {"acc": 0.5, "n": 2, "items": {"pred": [0, 0], "pred_norm": [1, 1], "answer_kl": [1.0, 0.0]}}}
    m = compute_measures(ref, mod)
    assert m["tasks"]["arc_easy"]["agreement"] == 1.0  # acc_norm task: pred_norm agrees everywhere
    assert m["tasks"]["boolq"]["agreement"] == 0.5  # acc task: pred
    assert m["tasks"]["arc_easy"]["answer_kl"] == pytest.approx(0.25) and m["tasks"]["boolq"]["answer_kl"] == 0.5
    assert m["average"]["agreement"] == 0.75 and m["average"]["answer_kl"] == pytest.approx(0.375)
    assert m["average"]["agreement_ci"][0] <= 0.75 <= m["average"]["agreement_ci"][1]


def test_measures_markdown_shows_accuracy_only_where_resolved():
    from recover_lora.report import compute_measures, measures_markdown

    def res(a, b, kl=None):
        r = {"big": {"acc": a / 400, "n": 400, "items": {"acc": [1] * a + [0] * (400 - a),
                                                         "pred": [0] * a + [1] * (400 - a)}},
             "tiny": {"acc": b / 400, "n": 400, "items": {"acc": [1] * b + [0] * (400 - b),
                                                          "pred": [0] * b + [1] * (400 - b)}}}
        if kl is not None:
            for t in r.values():
                t["items"]["answer_kl"] = [kl] * 400
        return r

    ref, deg, rec = res(300, 200), res(200, 199, 0.4), res(290, 230, 0.1)
    rep = compute_report(ref, deg, rec)
    md = measures_markdown({"degraded": compute_measures(ref, deg), "recovered": compute_measures(ref, rec)}, rep)
    assert "| picks the reference's choice | 87.4%" in md  # (300 + 399) / 800
    assert "| answer-token KL to the reference (nats) | 0.400" in md and "| 0.100" in md
    assert "| big | 400 | 75.0 | 50.0 | 72.5 | 90.0%" in md
    assert "does not resolve the damage on tiny" in md and "| tiny |" not in md
