"""lm-evaluation-harness 0.4.13 side by side with ours: its task YAMLs on local JSONL files, its
command line, its per-sample output read back, and the per-item comparison (used by
``tests/test_lmeval_agreement.py``, ``recover-lora bench --parts cpu-eval`` and
docs/lmeval_agreement.md). lm-eval itself runs in its own Python (its pins conflict with ours)."""

from __future__ import annotations

import glob
import json
from pathlib import Path

import numpy as np

from .lmeval_backend import write_lmeval_tasks

TASKS = ("arc_easy", "hellaswag", "piqa", "winogrande")
SPLIT_FILE = {"arc_easy": "arc_easy/test.jsonl", "hellaswag": "hellaswag/validation.jsonl",
              "piqa": "piqa/validation.jsonl", "winogrande": "winogrande/validation.jsonl"}
TIE = 1e-4  # nats; fp32 on different batch shapes differs by ~1e-5



def write_task_dir(dest: Path, data_dir: Path, lm_eval_dir: Path) -> list[str]:
    """Local lm-eval task YAMLs ``rl_<task>`` reading ``data_dir`` (the shipped ones,
    :func:`lmeval_backend.write_lmeval_tasks`); returns the task names."""
    return write_lmeval_tasks(dest, data_dir, list(TASKS), lm_eval_dir)


def lmeval_command(python: str, gguf: Path, task_dir: Path, out_dir: Path, limit: int,
                   tasks=TASKS) -> list[str]:
    return [python, "-m", "lm_eval", "--model", "hf", "--model_args",
            f"pretrained={gguf.parent},gguf_file={gguf.name},dtype=float32",
            "--tasks", ",".join(f"rl_{t}" for t in tasks), "--include_path", str(task_dir),
            "--limit", str(limit), "--batch_size", "32", "--device", "cpu", "--log_samples",
            "--output_path", str(out_dir)]


def read_lmeval(out_dir: Path, tasks=TASKS) -> dict[str, dict]:
    """Per task: acc, acc_norm and per-doc log-likelihoods from lm-eval's --log_samples output."""
    res_files = sorted(glob.glob(str(out_dir / "**" / "results_*.json"), recursive=True))
    if not res_files:
        raise FileNotFoundError(f"no lm-eval results under {out_dir}")
    results = json.loads(Path(res_files[-1]).read_text())["results"]
    out = {}
    for t in tasks:
        r = results[f"rl_{t}"]
        sfile = sorted(glob.glob(str(Path(res_files[-1]).parent / f"samples_rl_{t}_*.jsonl")))[-1]
        samples = sorted((json.loads(line) for line in open(sfile)), key=lambda s: s["doc_id"])
        out[t] = {"acc": r["acc,none"], "acc_norm": r.get("acc_norm,none"),
                  "lls": [[float(x[0]) for x in s["filtered_resps"]] for s in samples],
                  "acc_items": [s["acc"] for s in samples], "acc_norm_items": [s.get("acc_norm") for s in samples]}
    return out


def _near_tie(lls, tol=TIE) -> bool:
    s = np.sort(np.asarray(lls))
    return len(s) > 1 and s[-1] - s[-2] < tol


def compare(ours: dict, lme: dict, tasks=TASKS) -> dict[str, dict]:
    """Per task: both accuracies and how many items pick a different choice (ties counted apart)."""
    rows = {}
    for t in tasks:
        o, l = ours[t], lme[t]
        n = min(o["n"], len(l["lls"]))
        o_lls, l_lls = o["items"]["loglikelihoods"][:n], l["lls"][:n]
        diff = ties = 0
        max_dll = 0.0
        for a, b in zip(o_lls, l_lls):
            max_dll = max(max_dll, float(np.max(np.abs(np.subtract(a, b)))))
            if int(np.argmax(a)) != int(np.argmax(b)):
                if _near_tie(a) or _near_tie(b):
                    ties += 1
                else:
                    diff += 1
        norm_diff = None
        if "acc_norm" in o["items"] and l["acc_norm_items"] and l["acc_norm_items"][0] is not None:
            norm_diff = sum(int(x) != int(y) for x, y in zip(o["items"]["acc_norm"][:n], l["acc_norm_items"][:n]))
        o_acc = float(np.mean(o["items"]["acc"][:n]))
        o_norm = float(np.mean(o["items"]["acc_norm"][:n])) if "acc_norm" in o["items"] else None
        rows[t] = {"n": n, "ours_acc": o_acc, "lmeval_acc": l["acc"], "ours_acc_norm": o_norm,
                   "lmeval_acc_norm": l["acc_norm"], "choice_disagreements": diff, "tie_disagreements": ties,
                   "acc_norm_item_differences": norm_diff,
                   "max_abs_loglik_diff": max_dll}
    return rows


def markdown(rows: dict) -> str:
    lines = ["| task | n | ours acc | lm-eval acc | ours acc_norm | lm-eval acc_norm | per-item disagreements (non-tie) | max abs Δ loglik |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    f = lambda v: "-" if v is None else f"{100 * v:.2f}"  # noqa: E731
    for t, r in rows.items():
        lines.append(f"| {t} | {r['n']} | {f(r['ours_acc'])} | {f(r['lmeval_acc'])} | {f(r['ours_acc_norm'])} | "
                     f"{f(r['lmeval_acc_norm'])} | {r['choice_disagreements']} (+{r['tie_disagreements']} ties) | "
                     f"{r['max_abs_loglik_diff']:.2e} |")
    return "\n".join(lines)


