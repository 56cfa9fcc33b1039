"""``recover-lora bench --parts cpu-eval``: our evaluation beside lm-evaluation-harness's ``hf``
backend on the same items and machine, end to end (each a fresh process that loads the GGUF,
reads the data and scores), with the per-item results compared.

Three commands, timed one after another (nothing else should run meanwhile):

1. ``lm_eval --model hf ... --batch_size 32`` (lm-eval 0.4.13 in its own Python, ``--lmeval-python``);
2. ``recover-lora eval`` with the defaults (the choices of a question share one pass);
3. ``recover-lora eval --no-share-context`` (one row per choice, as lm-eval runs them).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from recover_lora.evaluate import lmeval_compat as lc
from recover_lora.utils import RecoverLoraError, read_json


def _timed(cmd: list[str], env: dict) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RecoverLoraError(f"{' '.join(cmd[:4])} ... failed:\n{proc.stderr[-2000:]}")
    return dt, proc


def bench_cpu_eval(model: str, data_dir: str | None, lmeval_python: str | None, limit: int, res: dict,
                   save: Callable[[], None] = lambda: None) -> dict[str, Any]:
    """Fill ``res`` with the three timings, the ratios and the per-item comparison."""
    from recover_lora.zoo import fetch

    if not data_dir or not all((Path(data_dir) / lc.SPLIT_FILE[t]).is_file() for t in lc.TASKS):
        raise RecoverLoraError(f"--parts cpu-eval needs --eval-data with {', '.join(lc.SPLIT_FILE.values())}")
    lmeval_python = lmeval_python or os.environ.get("RECOVER_LORA_LMEVAL_PYTHON")
    if not lmeval_python:
        raise RecoverLoraError("--parts cpu-eval needs --lmeval-python (a Python with lm-eval==0.4.13; see "
                               "docs/lmeval_agreement.md) or RECOVER_LORA_LMEVAL_PYTHON")
    gguf = Path(fetch(model))
    data_dir = str(Path(data_dir).resolve())
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    res.update(tasks=list(lc.TASKS), limit=limit, threads=os.environ.get("OMP_NUM_THREADS", "default"))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        lm_dir = subprocess.run([lmeval_python, "-c", "import lm_eval, os; print(os.path.dirname(lm_eval.__file__))"],
                                capture_output=True, text=True, check=True).stdout.strip()
        lc.write_task_dir(tmp / "tasks", Path(data_dir), Path(lm_dir))
        cmd = lc.lmeval_command(lmeval_python, gguf, tmp / "tasks", tmp / "lmeval", limit)
        res["lmeval_seconds"], _ = _timed(cmd, env)
        res["lmeval_command"] = " ".join(cmd[1:]).replace(str(tmp), "$TMP")
        save()
        lme = lc.read_lmeval(tmp / "lmeval")
        ours_cmd = [sys.executable, "-m", "recover_lora.cli", "eval", "--model", str(gguf), "--dtype", "float32",
                    "--device", "cpu", "--tasks", ",".join(lc.TASKS), "--data-dir", data_dir, "--limit", str(limit),
                    "--no-progress"]
        for key, extra in (("ours", []), ("ours_one_row_per_choice", ["--no-share-context"])):
            out = tmp / f"{key}.json"
            res[f"{key}_seconds"], _ = _timed(ours_cmd + extra + ["--out", str(out)], env)
            res[f"{key}_command"] = "recover-lora " + " ".join(ours_cmd[3:] + extra)
            rows = lc.compare(read_json(out)["results"], lme)
            res[f"{key}_vs_lmeval"] = rows
            res[f"{key}_item_differences"] = sum(r["choice_disagreements"] + (r["acc_norm_item_differences"] or 0)
                                                 for r in rows.values())
            save()
    res["speedup_vs_lmeval"] = round(res["lmeval_seconds"] / res["ours_seconds"], 2)
    res["speedup_vs_one_row_per_choice"] = round(res["ours_one_row_per_choice_seconds"] / res["ours_seconds"], 2)
    for k in ("lmeval_seconds", "ours_seconds", "ours_one_row_per_choice_seconds"):
        res[k] = round(res[k], 1)
    save()
    return res
