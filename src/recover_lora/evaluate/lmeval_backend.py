"""lm-evaluation-harness as an evaluation backend (``--eval.backend lm-eval``; ``pip install recover-lora[lmeval]``).

The built-in scorer reproduces lm-eval's numbers item for item and is faster (BENCHMARKS.md);
this backend runs lm-eval itself, in this process, for those who want its code to be the one
that scores. It reads the same local JSONL folder through the task YAMLs shipped in
``lmeval_tasks/`` (lm-eval 0.4.13's own task definitions with the dataset swapped for local
files), and its per-sample output is turned into our result format, which ``report`` reads.
``report`` also reads what the ``lm_eval`` command wrote (``--output_path ... --log_samples``).
"""

from __future__ import annotations

import glob
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ..utils import RecoverLoraError, log
from .tasks import get_task, parse_tasks

TEMPLATES = Path(__file__).with_name("lmeval_tasks")
PREFIX = "rl_"  # our tasks in lm-eval are rl_<name>, apart from its own (hub-reading) ones
# helper modules the hellaswag / winogrande YAMLs name with !function, copied from lm-eval's own tasks
HELPERS = {"hellaswag_utils.py": "hellaswag/utils.py", "preprocess_winogrande.py": "winogrande/preprocess_winogrande.py"}


def _lm_eval():
    try:
        import lm_eval  # noqa: PLC0415
    except ImportError:
        raise RecoverLoraError("--eval-backend lm-eval needs lm-evaluation-harness: pip install 'recover-lora[lmeval]'"
                               ) from None
    return lm_eval


def require_lmeval(data_dir) -> None:
    """Fail before any work when the lm-eval backend cannot run: not installed, or no local data."""
    _lm_eval()
    if not data_dir:
        raise RecoverLoraError("--eval-backend lm-eval reads local JSONL files: give --eval-data / --data-dir DIR")


def write_lmeval_tasks(dest: str | Path, data_dir: str | Path, tasks=None, lm_eval_dir: str | Path | None = None
                       ) -> list[str]:
    """Write lm-eval task YAMLs (``rl_<task>``) reading ``data_dir``'s JSONL files into ``dest``
    (usable with ``lm_eval --include_path DEST --tasks rl_arc_easy,...`` too). ``lm_eval_dir``: the
    lm_eval package folder to take the helper modules from (default: the one installed here).
    Returns the task names."""
    lm_eval_dir = Path(lm_eval_dir) if lm_eval_dir else Path(_lm_eval().__file__).parent
    dest, data_dir = Path(dest), Path(data_dir).resolve()
    dest.mkdir(parents=True, exist_ok=True)
    for name, src in HELPERS.items():
        shutil.copy(lm_eval_dir / "tasks" / src, dest / name)
    names = []
    for t in parse_tasks(tasks or "all"):
        task = get_task(t)
        files = {s: data_dir / task.local_dir / f"{s}.jsonl"
                 for s in {task.eval_split, task.fewshot_split, "train"} if s}
        files = {s: p for s, p in files.items() if p.is_file()}
        if task.eval_split not in files:
            raise RecoverLoraError(f"{t}: no {data_dir / task.local_dir / (task.eval_split + '.jsonl')}")
        body = (TEMPLATES / f"{t}.yaml").read_text()
        kw = "dataset_kwargs:\n  data_files:\n" + "".join(f"    {s}: {json.dumps(str(p))}\n" for s, p in files.items())
        if "train" in files and "training_split" not in body and task.fewshot_split == "train":
            kw += "training_split: train\n"
        (dest / f"{PREFIX}{t}.yaml").write_text(body.replace("dataset_name: null\n", "dataset_name: null\n" + kw))
        names.append(PREFIX + t)
    return names


def evaluate_lmeval(model, tokenizer, cfg, progress: bool = True, name: str | None = None) -> dict:
    """``evaluate()`` through lm-eval's ``simple_evaluate`` with its ``HFLM`` over this model
    object (a PEFT model: its base with the adapter layers in place); our result format."""
    require_lmeval(cfg.data_dir)
    lm_eval = _lm_eval()
    from lm_eval.models.huggingface import HFLM  # noqa: PLC0415
    from lm_eval.tasks import TaskManager  # noqa: PLC0415

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    device = next(base.parameters()).device
    log.info("evaluating %s with lm-eval %s", name or "the model", getattr(lm_eval, "__version__", "?"))
    with tempfile.TemporaryDirectory(prefix="rl-lmeval-") as tmp:
        names = write_lmeval_tasks(tmp, cfg.data_dir, cfg.tasks)
        lm = HFLM(pretrained=base, tokenizer=tokenizer, batch_size=cfg.batch_size or 16, device=str(device))
        out = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=TaskManager(include_path=tmp),
                                      num_fewshot=cfg.num_fewshot, limit=cfg.limit, log_samples=True,
                                      bootstrap_iters=0, fewshot_random_seed=cfg.seed, verbosity="WARNING")
    return from_lmeval(out["results"], out["samples"])


def _continuations(sample: dict) -> list[str]:
    args = sample.get("arguments")
    if isinstance(args, dict):  # 0.4.x: {"gen_args_0": {"arg_0": ctx, "arg_1": cont}, ...}
        return [a.get("arg_1", "") for _, a in sorted(args.items(), key=lambda kv: int(kv[0].rsplit("_", 1)[-1]))]
    return [a[1] for a in args or []]


def _gold(task: str, sample: dict) -> int:
    """The gold choice's index (a multiple-input task such as WinoGrande has its text as the target)."""
    try:
        return int(sample["target"])
    except (TypeError, ValueError):
        from .tasks import TASKS  # noqa: PLC0415

        if task in TASKS:  # our formatting of the same record names the gold choice's index
            return int(TASKS[task].format(sample["doc"]).gold)
        raise RecoverLoraError(f"{task}: cannot tell the gold choice of lm-eval's target {sample['target']!r}") from None


def from_lmeval(results: dict[str, Any], samples: dict[str, list] | None = None) -> dict:
    """lm-eval's results (``acc,none`` ...) and per-sample records -> ``{task: {acc, [acc_norm], n, items}}``."""
    out = {}
    for key, r in results.items():
        if not isinstance(r, dict) or "acc,none" not in r:
            continue
        task = key.removeprefix(PREFIX)
        entry: dict[str, Any] = {"acc": float(r["acc,none"])}
        if r.get("acc_norm,none") is not None:
            entry["acc_norm"] = float(r["acc_norm,none"])
        ss = sorted((samples or {}).get(key) or [], key=lambda s: s["doc_id"])
        entry["n"] = len(ss) if ss else int(r.get("samples", 0) or 0)
        if ss:
            lls = [[float(x[0]) for x in s["filtered_resps"]] for s in ss]
            items: dict[str, list] = {"acc": [int(s["acc"]) for s in ss], "pred": [int(np.argmax(x)) for x in lls],
                                      "gold": [_gold(task, s) for s in ss], "loglikelihoods": lls}
            if "acc_norm" in entry:  # lm-eval normalises by the choice's length in characters
                items["acc_norm"] = [int(s["acc_norm"]) for s in ss]
                lens = [[max(len(c) - (1 if c.startswith(" ") else 0), 1) for c in _continuations(s)] for s in ss]
                items["pred_norm"] = [int(np.argmax(np.asarray(x) / np.asarray(n, dtype=float)))
                                      for x, n in zip(lls, lens)]
            entry["items"] = items
        entry["source"] = "lm-eval"
        out[task] = entry
    return out


def is_lmeval_results(doc: Any) -> bool:
    return isinstance(doc, dict) and isinstance(doc.get("results"), dict) and any(
        isinstance(v, dict) and "acc,none" in v for v in doc["results"].values())


def read_results(path: str | Path) -> dict:
    """A results file as ``report`` reads it: ours (``eval --out-file``), or lm-eval's ``results_*.json``
    (a file or the ``--output_path`` folder; per item from its ``samples_<task>_*.jsonl`` beside it)."""
    path = Path(path)
    if path.is_dir():
        found = sorted(glob.glob(str(path / "**" / "results_*.json"), recursive=True))
        if not found:
            raise RecoverLoraError(f"{path}: no lm-eval results_*.json in it")
        path = Path(found[-1])
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise RecoverLoraError(f"cannot read results {path}: {e}") from None
    if not is_lmeval_results(doc):
        return doc
    stamp = path.stem.removeprefix("results_")
    samples = {}
    for task in doc["results"]:
        files = sorted(glob.glob(str(path.parent / f"samples_{task}_{stamp}.jsonl"))) or \
            sorted(glob.glob(str(path.parent / f"samples_{task}_*.jsonl")))
        if files:
            samples[task] = [json.loads(ln) for ln in Path(files[-1]).read_text().splitlines() if ln.strip()]
    if not samples:
        log.warning("%s: no samples_*.jsonl beside it (run lm_eval with --log_samples): accuracies without "
                    "per-item results, so no confidence intervals", path)
    return {"model": doc.get("model_name") or doc.get("config", {}).get("model_args"), "backend": "lm-eval",
            "results": from_lmeval(doc["results"], samples)}
