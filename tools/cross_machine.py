"""How much the machine a study row was made on moves its agreement with the reference.

A study's reference is evaluated once and kept (``<model>/eval/reference*.json``); on a fresh machine
its answers are made again and compared with the kept evaluation, choice by choice
(``reference*-recheck.json``, which also keeps this machine's choices). A row made on that machine
is measured against the kept choices; this tool measures it against both, so the difference is a
figure, not a guess. ``--remake`` first evaluates the reference again here (its kept answers file is
set aside and put back), which is what writes the recheck entry.

    python tools/cross_machine.py study-cpu.yaml smollm2 [--remake]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from recover_lora.report import compute_measures  # noqa: E402
from recover_lora.study import StudyConfig  # noqa: E402
from recover_lora.study.config import accuracy_config, eval_config, slug  # noqa: E402
from recover_lora.study.results import pool_mmlu  # noqa: E402
from recover_lora.study.run import answers_file, cpu_name, reference_answers  # noqa: E402


def remake(cfg: StudyConfig, model: str) -> None:
    """Evaluate ``model``'s reference again on this machine (appends to its recheck file)."""
    from recover_lora.config import RecoverConfig
    from recover_lora.load import load_model, load_tokenizer

    load = RecoverConfig.from_dict(cfg.recover).load
    ev = Path(cfg.study_dir) / slug(model) / "eval"
    ecfg, acfg = eval_config(cfg, model), accuracy_config(cfg, model)
    path = ev / answers_file(ecfg)
    aside = path.with_suffix(".kept")
    if path.exists():
        path.rename(aside)
    try:
        reference_answers(path, load_model(cfg.models[model], load), load_tokenizer(cfg.models[model], load),
                          acfg or ecfg, ev / ("reference-accuracy.json" if acfg else "reference.json"))
    finally:
        if aside.exists():
            path.unlink(missing_ok=True)
            aside.rename(path)


def with_choices(results: dict, now: dict) -> dict:
    """``results`` (a kept reference evaluation) with this machine's choices, cut to its item counts."""
    out = copy.deepcopy(results)
    for t, r in out.items():
        for k, v in (now.get(t, {}).get("items_now") or {}).items():
            if k in r.get("items", {}):
                r["items"][k] = v[:len(r["items"][k])]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config")
    ap.add_argument("model")
    ap.add_argument("--remake", action="store_true", help="evaluate the reference again here first")
    a = ap.parse_args()
    cfg = StudyConfig.from_yaml(a.config)
    if a.remake:
        remake(cfg, a.model)
    mdir = Path(cfg.study_dir) / slug(a.model)
    rechecks = sorted(mdir.glob("eval/*-recheck.json"))
    entries = [e for f in rechecks for e in json.loads(f.read_text()) if "items_now" in next(iter(e["tasks"].values()))]
    if not entries:
        sys.exit(f"no recheck with this machine's choices under {mdir}/eval: run with --remake")
    entry = entries[-1]
    kept = json.loads((mdir / "eval" / "reference.json").read_text())["results"]
    now = with_choices(kept, entry["tasks"])
    print(f"reference evaluated again on {entry['cpu']} ({entry['when']}); this machine: {cpu_name()}")
    print("| run | made on | agreement, kept reference | agreement, reference made again |")
    print("|---|---|---:|---:|")
    for done in sorted(mdir.glob("*/*/done.json")):
        d = json.loads(done.read_text())
        rec = pool_mmlu(json.loads((done.parent / "eval" / "recovered.json").read_text())["results"])
        a_kept = compute_measures(pool_mmlu(kept), rec)["average"]["agreement"]  # as RESULTS.md: MMLU pooled
        a_now = compute_measures(pool_mmlu(now), rec)["average"]["agreement"]
        cpu = d.get("cpu") or "(not recorded)"
        print(f"| {d['damage']}/{d['method']} | {cpu} | {100 * a_kept:.1f}% | {100 * a_now:.1f}% |")


if __name__ == "__main__":
    main()
