"""Opt-in: our scores on SmolLM2-135M agree with lm-evaluation-harness 0.4.13's.

Runs when ``lm_eval`` is importable here, or when ``RECOVER_LORA_LMEVAL_PYTHON`` names a Python
that has it (lm-eval pins conflict with ours, so it normally lives in its own venv). The eval data
comes from ``RECOVER_LORA_EVAL_DATA`` (default ``../shared/eval-data`` next to the repo);
``RECOVER_LORA_LMEVAL_LIMIT`` (default 500) items of arc_easy, hellaswag, piqa and winogrande are
scored by both on CPU in float32. Bar: acc and acc_norm within 0.2 points; per-item choices
identical apart from near-ties (top two log-likelihoods within ``TIE`` in either run).

The same comparison as a script (used for docs/lmeval_agreement.md)::

    python tests/test_lmeval_agreement.py --ours ours.json --lmeval-out LMEVAL_OUTPUT_DIR
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from recover_lora.evaluate.lmeval_compat import (SPLIT_FILE, TASKS, compare, lmeval_command, markdown, read_lmeval,
                                                 write_task_dir)

REPO = Path(__file__).resolve().parent.parent


def _lmeval_python() -> str | None:
    """Opt-in (minutes of CPU at 500 items a task): RECOVER_LORA_LMEVAL_PYTHON names a Python with
    lm-eval 0.4.13, or RECOVER_LORA_LMEVAL=1 uses this one (lm-eval is in the dev extra)."""
    env = os.environ.get("RECOVER_LORA_LMEVAL_PYTHON")
    if env:
        return env
    if os.environ.get("RECOVER_LORA_LMEVAL") == "1" and importlib.util.find_spec("lm_eval") is not None:
        return sys.executable
    return None


@pytest.mark.integration
def test_agrees_with_lm_evaluation_harness(tmp_path):
    python = _lmeval_python()
    if python is None:
        pytest.skip("opt-in: RECOVER_LORA_LMEVAL=1 (lm-eval installed here) or RECOVER_LORA_LMEVAL_PYTHON=PYTHON")
    data_dir = Path(os.environ.get("RECOVER_LORA_EVAL_DATA", REPO.parent / "shared" / "eval-data")).resolve()
    if not all((data_dir / SPLIT_FILE[t]).is_file() for t in TASKS):
        pytest.skip(f"eval data not found under {data_dir}")
    limit = int(os.environ.get("RECOVER_LORA_LMEVAL_LIMIT", "500"))
    from recover_lora import load, zoo
    from recover_lora.evaluate import EvalConfig, evaluate

    gguf = zoo.fetch("smollm2")
    lm_dir = Path(subprocess.run([python, "-c", "import lm_eval, os; print(os.path.dirname(lm_eval.__file__))"],
                                 capture_output=True, text=True, check=True).stdout.strip())
    task_dir = tmp_path / "tasks"
    write_task_dir(task_dir, data_dir, lm_dir)
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(lmeval_command(python, gguf, task_dir, tmp_path / "lmeval", limit),
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lme = read_lmeval(tmp_path / "lmeval")

    lc = load.LoadConfig(dtype="float32", device="cpu")
    model, tok = load.load_model(str(gguf), lc), load.load_tokenizer(str(gguf), lc)
    ours = evaluate(model, tok, EvalConfig(tasks=list(TASKS), data_dir=str(data_dir), limit=limit), progress=False)
    rows = compare(ours, lme)
    print(markdown(rows))
    for t, r in rows.items():
        assert abs(r["ours_acc"] - r["lmeval_acc"]) <= 0.002, (t, r)
        if r["lmeval_acc_norm"] is not None and r["ours_acc_norm"] is not None:
            assert abs(r["ours_acc_norm"] - r["lmeval_acc_norm"]) <= 0.002, (t, r)
        assert r["choice_disagreements"] == 0, (t, r)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ours", required=True, help="results JSON from evaluate() or `recover-lora eval --out`")
    ap.add_argument("--lmeval-out", required=True, help="lm-eval --output_path folder (with --log_samples)")
    a = ap.parse_args()
    doc = json.loads(Path(a.ours).read_text())
    rows = compare(doc.get("results", doc), read_lmeval(Path(a.lmeval_out)))
    print(markdown(rows))
    print(json.dumps(rows, indent=1))
