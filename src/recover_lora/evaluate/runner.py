"""Evaluate a model on the benchmark tasks: build lm-eval's requests, score them, compute acc/acc_norm."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from ..forward import warn_slow_cpu_bf16
from ..utils import RecoverLoraError, log
from .data import load_task_docs
from .scorer import encode_pairs, score
from .tasks import FewshotSampler, Formatted, get_task, parse_tasks
from ..config import EvalConfig  # noqa: F401 - re-exported


def _metrics(task, forms: list[Formatted], lls: list[float], greedy: list[bool]) -> dict:
    """lm-eval ``ConfigurableTask.process_results`` for multiple_choice, aggregated by mean."""
    correct, correct_norm, preds, preds_norm, golds, all_lls = [], [], [], [], [], []
    k = 0
    for f in forms:
        n = len(f.choices)
        ll = np.array(lls[k:k + n], dtype=np.float64)
        k += n
        pred = int(np.argmax(ll))
        pred_norm = int(np.argmax(ll / np.array([float(len(c)) for c in f.choices])))
        correct.append(int(pred == f.gold))
        correct_norm.append(int(pred_norm == f.gold))
        preds.append(pred)
        preds_norm.append(pred_norm)
        golds.append(f.gold)
        all_lls.append([float(x) for x in ll])
    out = {"acc": float(np.mean(correct)) if correct else float("nan")}
    if "acc_norm" in task.metrics:
        out["acc_norm"] = float(np.mean(correct_norm)) if correct_norm else float("nan")
    out["n"] = len(forms)
    out["items"] = {"acc": correct, "pred": preds, "gold": golds, "loglikelihoods": all_lls}
    if "acc_norm" in task.metrics:
        out["items"]["acc_norm"] = correct_norm
        out["items"]["pred_norm"] = preds_norm
    return out


def build_requests(cfg: EvalConfig) -> dict[str, dict]:
    """Per task: the loaded splits and the formatted documents (no model needed)."""
    out = {}
    for name in parse_tasks(cfg.tasks):
        task = get_task(name)
        ev, fs = load_task_docs(task, cfg.data_dir, cfg.source, cfg.limit, cfg.num_fewshot)
        if not ev.docs:
            raise RecoverLoraError(f"{name}: no records in {ev.origin}")
        sampler = FewshotSampler(task, fs.docs, cfg.seed) if fs is not None else None
        forms = [task.format(d, sampler.sample(cfg.num_fewshot) if sampler else ()) for d in ev.docs]
        out[name] = {"task": task, "split": ev, "fewshot": fs, "forms": forms}
    return out


def evaluate(model, tokenizer, cfg: EvalConfig | None = None, progress: bool = True, reference=None,
             name: str | None = None, resume: str | Path | None = None) -> dict:
    """Score ``model`` on ``cfg.tasks``; returns ``{task: {acc, [acc_norm], n, split, source, items}}``.

    ``items`` holds per-document lists (``acc``, ``acc_norm``, ``pred``, ``pred_norm``, ``gold``,
    ``loglikelihoods``) in dataset order. All tasks' requests are scored in one batched pass.
    ``reference``: also the answer-token KL to it, KL(reference || model) averaged over the tokens
    of all the choices of an item (``items["answer_kl"]``; the task's mean as ``answer_kl``): a
    measure of a repair that resolves differences accuracy on a few hundred items cannot. The
    reference is a model (run beside) or its answers kept by :func:`evaluate_reference`.
    ``name``: what the progress bar calls the model (reference, degraded, repaired ...).
    ``resume``: a folder keeping finished batches, so that an interrupted evaluation restarted with
    the same model and settings scores only the rest (remove it once the result is written).
    """
    cfg = cfg or EvalConfig()
    if cfg.backend == "lm-eval":
        from .lmeval_backend import evaluate_lmeval  # noqa: PLC0415

        if reference is not None:
            log.warning("the lm-eval backend scores choices only: no answer-token KL to the reference")
        return evaluate_lmeval(model, tokenizer, cfg, progress, name)
    return _evaluate(model, tokenizer, cfg, progress, reference, name=name, resume=resume)


def evaluate_reference(model, tokenizer, cfg: EvalConfig | None = None, progress: bool = True,
                       name: str = "reference", resume: str | Path | None = None):
    """Evaluate a reference and keep its answers: ``(results, ReferenceAnswers)``, the second to
    pass as ``reference=`` when evaluating other models on these tasks (or on fewer items of them);
    None with the lm-eval backend. ``resume``: as for :func:`evaluate`."""
    from .refcache import ReferenceAnswers  # noqa: PLC0415

    if cfg is not None and cfg.backend != "builtin":  # lm-eval keeps no hidden states: no answers
        return evaluate(model, tokenizer, cfg, progress, name=name), None
    kept: dict = {}
    results = _evaluate(model, tokenizer, cfg, progress, None, kept, name=name, resume=resume)
    return results, ReferenceAnswers.from_kept(model, kept.pop("_requests"), kept)


def _evaluate(model, tokenizer, cfg: EvalConfig | None, progress: bool, reference, keep_hidden: dict | None = None,
              name: str | None = None, resume: str | Path | None = None):
    from ..load import needs_bos  # noqa: PLC0415

    cfg = cfg or EvalConfig()
    t0 = time.time()
    built = build_requests(cfg)
    add_bos = needs_bos(tokenizer, model.config) if cfg.add_bos is None else cfg.add_bos
    pairs: list[tuple[str, str]] = []
    spans: dict[str, tuple[int, int]] = {}
    groups: list[tuple[str, int]] = []  # the question of each request: its choices share one pass
    for name, b in built.items():
        start = len(pairs)
        for j, f in enumerate(b["forms"]):
            pairs.extend(zip(f.contexts, f.continuations))
            groups.extend([(name, j)] * len(f.contexts))
        spans[name] = (start, len(pairs))
    requests = encode_pairs(tokenizer, pairs, add_bos)
    t1 = time.time()
    was_training = getattr(model, "training", False)
    model.eval()
    if cfg.autocast not in ("off", "bf16"):
        raise RecoverLoraError(f"eval autocast must be off or bf16, not {cfg.autocast!r}")
    device = next(model.parameters()).device.type
    if cfg.autocast == "bf16" and device == "cpu":
        warn_slow_cpu_bf16()
    try:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=cfg.autocast == "bf16"):
            res = score(model, requests, batch_size=cfg.batch_size, max_batch_tokens=cfg.max_batch_tokens,
                        progress=progress, pad_id=tokenizer.pad_token_id or 0,
                        desc=f"eval {name + ': ' if name else ''}{','.join(built)}", groups=groups,
                        share_context=cfg.share_context, reference=reference, keep_hidden=keep_hidden,
                        resume=resume)
        if keep_hidden is not None:
            keep_hidden["_requests"] = requests
    finally:
        if was_training:
            model.train()
    t2 = time.time()
    results = {}
    for name, b in built.items():
        s, e = spans[name]
        lls = [r[0] for r in res[s:e]]
        greedy = [r[1] for r in res[s:e]]
        m = _metrics(b["task"], b["forms"], lls, greedy)
        if reference is not None:
            kl = np.array([r[2] for r in res[s:e]])
            nt = np.array([r[3] for r in res[s:e]])
            bounds = np.cumsum([0] + [len(f.choices) for f in b["forms"]])
            item_kl = [float(kl[a:z].sum() / nt[a:z].sum()) for a, z in zip(bounds[:-1], bounds[1:])]
            m["answer_kl"] = float(np.mean(item_kl))
            m["items"]["answer_kl"] = item_kl
        m["split"] = b["split"].split
        m["source"] = b["split"].origin
        m["num_fewshot"] = cfg.num_fewshot
        if not cfg.keep_items:
            m.pop("items")
        results[name] = m
    log.info("evaluated %d requests in %.1fs (tokenize %.1fs, score %.1fs), add_bos=%s",
             len(requests), t2 - t0, t1 - t0, t2 - t1, add_bos)
    return results


def config_dict(cfg: EvalConfig) -> dict:
    d = asdict(cfg)
    d["tasks"] = parse_tasks(cfg.tasks)
    for k, default in (("backend", "builtin"), ("autocast", "off")):
        if d[k] == default:  # as before the field existed: cached evaluations keep their keys
            del d[k]
    return d
