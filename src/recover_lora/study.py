"""The study: every (model, damage, method) of a YAML file, resumable, summarised in RESULTS.md.

    recover-lora study --config study.yaml --dry-run                  # the plan: done / started / to do
    recover-lora study --config study.yaml --only smollm2/noise-all   # a piece (globs: '*/*/auto+svd')
    recover-lora study --config study.yaml --results-only             # RESULTS.md from finished runs
    recover-lora study --config study.yaml --jobs 6                   # 6 runs side by side on one GPU

For each model the reference is loaded once and evaluated once; for each damage the degraded
model is made in memory (seeded, so every session makes the same one) and evaluated once; then
each method is ``recover.recover`` on a fresh copy of it, followed by an evaluation of the
repaired model only. Methods that keep the common synthetic-data settings share one data pool
per model (``<model>/synth``: it depends only on the reference). Layout of ``study_dir``::

    study.json                        the resolved config (write_results reads it)
    commands.log                      every invocation: time, device, command
    <model>/eval/reference.json       per-item results (loglikelihoods dropped)
    <model>/<damage>/eval/degraded.json
    <model>/<damage>/<method>/        recover's out_dir (adapter/ or model/, report.json, ...),
        timing.json                   wall seconds, summed over resumed sessions
        checkpoint.pt                 while unfinished (deleted once done.json is written)
        eval/recovered.json, eval/report.{md,json,png}
        done.json                     written last: a rerun skips the run
    queue.json, logs/worker-K.log     with --jobs: the runs handed out, each worker's log

A run without done.json resumes: recover() continues from its checkpoint and reuses its data.

With ``--jobs N`` the runs of one invocation go to N worker processes that share the machine's
device: a 135M-0.5B model at a 32 x 128 batch leaves an H100 mostly idle (the step is bound by host
overhead, BENCHMARKS.md), so runs side by side finish sooner than one after another. What runs
share is made first, in this process: the reference and degraded evaluations, the synthetic pool,
and the diagnosis of the auto placement (one per model and damage). Each worker then claims runs
one at a time (an exclusive ``.claim`` file in the run folder) in plan order, loading a model only
when it claims a run that needs it. Results are the same as one process's.

On a CPU, two invocations with disjoint ``--only`` selections can run side by side, a thread and
a core each (niced, so that the machine still answers): what both need (the reference's kept
answers, a degraded model's evaluations, the synthetic pool) is made under a file lock by the
first, and the second waits for it and reuses it.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import math
import re
import shlex
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from .recover import RecoverConfig, train_synth_config
from .recover import recover as run_recover  # module-level name: tests count calls by patching it
from .report import ReportConfig, build_report, compute_report
from .evaluate.tasks import DEFAULT_TASKS  # the seven benchmarks, MMLU as its three subjects
from .utils import RecoverLoraError, atomic_write_bytes, atomic_write_json, log, read_json, save_figure



@dataclass
class StudyConfig:
    """What ``study.yaml`` holds (see the file at the repository root)."""

    study_dir: str = "runs/study"
    results: str = "RESULTS.md"
    models: dict[str, str] = field(default_factory=dict)  # name -> spec (zoo name, folder, mha:SPEC)
    damages: dict[str, list] = field(default_factory=dict)  # name -> ops ("noise:rel=0.1" or dicts)
    # model -> {damage: ops}: the same kind of damage at a strength that harms that model comparably
    # (a 0.5B model shrugs off noise that cripples a 135M one, and a gap of one point measures nothing)
    damage_overrides: dict[str, dict[str, list]] = field(default_factory=dict)
    damage_seed: int = 0
    recover: dict[str, Any] = field(default_factory=dict)  # RecoverConfig fields common to every run
    eval: dict[str, Any] = field(default_factory=lambda: {"tasks": list(DEFAULT_TASKS), "data_dir": None,
                                                          "limit": None})
    methods: dict[str, dict] = field(default_factory=dict)  # name -> RecoverConfig overrides
    sweep: dict[str, Any] | None = None  # {method, sequences: [1000, ...], steps: one-pass | N}
    # model -> {damages: [...], methods: [...]} or a list of such blocks: the runs of that model
    # (default: every damage x method); with a plan, only the models it names run
    plan: dict[str, Any] = field(default_factory=dict)
    # {limit: 500, methods: [...]}: accuracy on more items for the reference, the degraded model and
    # these methods (the measures of every run, ``eval``, use fewer items: agreement and answer KL
    # resolve a repair on 200 items a task, accuracy does not)
    accuracy: dict[str, Any] | None = None
    mirror: str | None = None  # folder the small result files are copied to as each run finishes
    goals: dict[str, Any] = field(default_factory=lambda: {
        "method": "auto+svd", "presets": ["kv", "attn-mlp"], "baselines": ["full-kd", "svd-only"],
        "min_gap_closed": 0.9})

    @classmethod
    def from_yaml(cls, path: str | Path) -> "StudyConfig":
        path = Path(path)
        try:
            d = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise RecoverLoraError(f"cannot read study config {path}: {e}") from None
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise RecoverLoraError(f"unknown study keys {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}")
        cfg = cls(**d)
        for m, over in cfg.damage_overrides.items():
            if m not in cfg.models or not set(over or {}) <= set(cfg.damages):
                raise RecoverLoraError(f"damage_overrides[{m!r}]: models are {list(cfg.models)}, damages "
                                       f"{list(cfg.damages)}; it names {m!r}: {list(over or {})}")
        base = path.resolve().parent  # relative paths are relative to the YAML file
        cfg.study_dir = str(base / cfg.study_dir)
        cfg.results = str(base / cfg.results)
        for m in cfg.plan:
            methods = set(cfg.all_methods())
            for sel in cfg.plan_blocks(m):
                if m not in cfg.models or not set(sel.get("damages") or []) <= set(cfg.damages) \
                        or not set(sel.get("methods") or []) <= methods or set(sel) - {"damages", "methods"}:
                    raise RecoverLoraError(f"plan[{m!r}]: models are {list(cfg.models)}, damages {list(cfg.damages)}, "
                                           f"methods {sorted(methods)}; it has {sel}")
        if cfg.accuracy and not set(cfg.accuracy.get("methods", [])) <= set(cfg.all_methods()):
            raise RecoverLoraError(f"accuracy.methods {cfg.accuracy.get('methods')}: not all in {list(cfg.all_methods())}")
        if cfg.mirror:
            cfg.mirror = str(base / cfg.mirror)
        cfg.eval = {**cls().eval, **cfg.eval}
        if cfg.eval.get("data_dir"):
            cfg.eval["data_dir"] = str(base / cfg.eval["data_dir"])
        return cfg

    def all_methods(self) -> dict[str, dict]:
        """The named methods plus the data sweep (``<method>@1k`` ...: that many synthetic sequences)."""
        out = dict(self.methods)
        sw = self.sweep or {}
        if sw:
            base = merge(self.recover, self.methods[sw["method"]])
            d = base.get("distill", {})
            per_step = d.get("batch_size", 32) * d.get("grad_accum", 1)
            for n in sw.get("sequences", []):
                steps = sw.get("steps", "one-pass")
                steps = max(1, math.ceil(n / per_step)) if steps == "one-pass" else int(steps)
                warm = min(d.get("warmup_steps", 30), max(1, steps // 10))
                out[f"{sw['method']}@{_short(n)}"] = merge(self.methods[sw["method"]], {
                    "synth": {"num_sequences": n}, "distill": {"steps": steps, "warmup_steps": warm}})
        return out

    def plan_blocks(self, model: str) -> list[dict]:
        """The plan's blocks ({damages, methods}) of ``model``; one block of everything without a plan."""
        sel = self.plan.get(model) if self.plan else {}
        return [dict(b or {}) for b in (sel if isinstance(sel, list) else [sel])]

    def recover_config(self, model: str, damage: str, method: str, pool: Path | None) -> RecoverConfig:
        over = self.all_methods()[method]
        fixed = {"reference": self.models[model], "degraded": f"{self.models[model]} + {damage}",
                 "out_dir": str(run_dir(self, model, damage, method)), "data": str(pool) if pool else None,
                 "eval": {"tasks": [], "data_dir": self.eval.get("data_dir"), "limit": self.eval.get("limit")}}
        return RecoverConfig.from_dict(merge(merge(self.recover, over), fixed))

    def damage_ops(self, model: str, damage: str) -> list:
        """The ops of ``damage`` for ``model``: its override, else the study-wide definition."""
        return (self.damage_overrides.get(model) or {}).get(damage, self.damages[damage])

    def uses_pool(self, method: str) -> bool:
        over = self.all_methods()[method]
        return "synth" not in over and over.get("method", self.recover.get("method")) != "sft-lora"


def merge(a: dict, b: dict) -> dict:
    """Deep merge of two config dicts (b wins)."""
    out = copy.deepcopy(a)
    for k, v in (b or {}).items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def _short(n: int) -> str:
    return f"{n // 1000}k" if n % 1000 == 0 and n >= 1000 else str(n)


def slug(name: str) -> str:
    """A folder name: 'auto+svd@1k' -> 'auto-svd-1k'."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-")


def run_dir(cfg: StudyConfig, model: str, damage: str, method: str) -> Path:
    return Path(cfg.study_dir) / slug(model) / slug(damage) / slug(method)


def degrade_config(cfg: StudyConfig, damage: str, model: str | None = None):
    from .degrade import DegradeConfig, op_from_dict, parse_op

    spec = cfg.damage_ops(model, damage) if model is not None else cfg.damages[damage]
    ops = [parse_op(o) if isinstance(o, str) else op_from_dict(o) for o in spec]
    return DegradeConfig(ops=ops, seed=cfg.damage_seed)


# ---------------------------------------------------------------------------------- the plan

@dataclass
class Run:
    model: str
    damage: str
    method: str
    dir: Path

    @property
    def name(self) -> str:
        return f"{self.model}/{self.damage}/{self.method}"

    def status(self) -> str:
        if (self.dir / "done.json").exists():
            return "done"
        if (self.dir / "failed.json").exists():
            return f"failed: {read_json(self.dir / 'failed.json').get('error', '?')[:120]} (tried again next call)"
        if (self.dir / "report.json").exists():
            return "trained, evaluation pending"
        if (self.dir / "checkpoint.pt").exists():
            return "started: resumes from its checkpoint"
        if self.dir.is_dir() and any(self.dir.iterdir()):
            return "started"
        return "to do"


def _selected(run: Run, only: list[str] | None) -> bool:
    if not only:
        return True
    for pat in only:
        parts = (pat.strip("/").split("/") + ["*", "*"])[:3]
        if all(fnmatch.fnmatchcase(v, p) or fnmatch.fnmatchcase(slug(v), p)
               for v, p in zip((run.model, run.damage, run.method), parts)):
            return True
    return False


def plan(cfg: StudyConfig, only: list[str] | None = None) -> list[Run]:
    """The runs, model by model in the config's order (a plan's damages and methods in its order)."""
    runs: dict[str, Run] = {}
    for m in cfg.models:
        if cfg.plan and m not in cfg.plan:
            continue
        for sel in cfg.plan_blocks(m):
            for d in sel.get("damages") or cfg.damages:
                for k in sel.get("methods") or cfg.all_methods():
                    runs.setdefault(f"{m}/{d}/{k}", Run(m, d, k, run_dir(cfg, m, d, k)))
    # model by model, block by block, damage by damage (one degraded model made at a time): a
    # plan's first block lands complete before its later ones (a sweep) start
    return [r for r in runs.values() if _selected(r, only)]


def describe_plan(cfg: StudyConfig, runs: list[Run]) -> str:
    st = [r.status() for r in runs]
    lines = [f"study {cfg.study_dir}: {len(runs)} runs selected; {st.count('done')} done, "
             f"{sum(s not in ('done', 'to do') for s in st)} started, {st.count('to do')} to do"]
    width = max((len(r.name) for r in runs), default=0)
    for r, s in zip(runs, st):
        extra = ""
        if s == "done":
            d = read_json(r.dir / "done.json")
            extra = f" ({d.get('gpu_minutes', 0):.1f} GPU min, gap closed {_pct(d.get('gap_closed'))})"
        lines.append(f"  {r.name:<{width}}  {s}{extra}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- running

@contextlib.contextmanager
def timed(path: Path, key: str):
    """Add the wall seconds of the block to ``path[key]``, and this process's CPU seconds (all its
    threads) to ``path[key + "_cpu"]``, also when it is interrupted. On a CPU the CPU seconds are the
    cost: they do not count time the process waited (paused, or sharing the machine)."""
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        yield
    finally:
        d = read_json(path) if path.exists() else {}
        d[key] = round(d.get(key, 0.0) + time.perf_counter() - t0, 3)
        d[f"{key}_cpu"] = round(d.get(f"{key}_cpu", 0.0) + time.process_time() - c0, 3)
        atomic_write_json(path, d)


@contextlib.contextmanager
def locked(path: Path):
    """Hold an exclusive lock on ``path`` (waiting for it): two study processes run side by side
    (``--only`` on disjoint runs, a core each) make what they share (the reference's answers, a
    degraded model's evaluation, the synthetic pool) once, the second waiting and then reusing it."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def slim(results: dict) -> dict:
    """Eval results without per-choice loglikelihoods: the report needs the acc / acc_norm items only,
    kept as "0110..." strings when they are all 0/1 (``report.item_array`` reads both forms); the
    study's result files travel back from the device and are committed, so size matters."""
    out = {}
    for t, r in results.items():
        r = dict(r)
        if "items" in r:
            r["items"] = {k: _compact(v) for k, v in r["items"].items() if k in ("acc", "acc_norm", "pred", "pred_norm")}
            if "answer_kl" in results[t]["items"]:
                r["items"]["answer_kl"] = [float(f"{x:.5g}") for x in results[t]["items"]["answer_kl"]]
        out[t] = r
    return out


def _compact(items: list) -> list | str:
    """0/1 scores and choice indices below 10 as a string of digits ("0110", "3102")."""
    ok = all(isinstance(x, (int, bool)) or float(x).is_integer() for x in items) and all(0 <= x <= 9 for x in items)
    return "".join(str(int(x)) for x in items) if ok else items


def _eval_key(ecfg, answer_kl: bool) -> dict:
    from .evaluate.runner import config_dict

    return {**config_dict(ecfg), "answer_kl": answer_kl}


def _serves(have: dict | None, want: dict) -> bool:
    """An evaluation made with ``have`` settings answers a request for ``want`` ones: the same, or
    with the answer-token KL where it is not asked for."""
    if not have:
        return False
    return have == want or (have.get("answer_kl") and not want["answer_kl"] and {**have, "answer_kl": False} == want)


def _have(path: Path, key: dict) -> bool:
    return path.exists() and _serves(read_json(path).get("config"), key)


def first_items(results: dict, limit: int | None) -> dict:
    """The results of the first ``limit`` items of each task (slimmed results): what an evaluation
    with ``limit`` gives, since a limit takes each task's first documents in dataset order."""
    from .report import item_array

    out = {}
    for t, r in results.items():
        r = dict(r)
        items = {k: v[:limit] for k, v in r.get("items", {}).items()}
        r["items"] = items
        r["n"] = min(r.get("n", 0), limit) if limit is not None else r.get("n", 0)
        for m in ("acc", "acc_norm", "answer_kl"):
            if m in items:
                r[m] = float(np.mean(item_array(items[m])))
        out[t] = r
    return out


def cached_eval(path: Path, get_model, tokenizer, ecfg, progress: bool = True, reference=None,
                source: Path | None = None) -> dict:
    """Evaluate once: reuse ``path`` when it was made with the same evaluation settings (or with the
    answer-token KL where it is not asked for), else take the first items of ``source`` (an
    evaluation of the same tasks on at least as many items), else evaluate ``get_model()`` (called
    only then) and write it. ``reference``: add the answer-token KL to it (a model, or its kept
    answers)."""
    from .evaluate import evaluate

    key = _eval_key(ecfg, reference is not None)
    if path.exists():
        d = read_json(path)
        if _serves(d.get("config"), key):
            return d["results"]
        log.info("%s was made with other evaluation settings: evaluating again", path)
    if source is not None and source.exists():
        d = read_json(source)
        big = (d.get("config") or {}).get("limit")
        if (big is None or (ecfg.limit is not None and ecfg.limit <= big)) \
                and _serves(d["config"], {**key, "limit": big}):
            res = first_items(d["results"], ecfg.limit)
            atomic_write_json(path, {"config": key, "derived_from": source.name, "results": res})
            return res
    t0 = time.perf_counter()
    res = slim(evaluate(get_model(), tokenizer, ecfg, progress=progress, reference=reference,
                        name=f"{path.parent.parent.name}/{path.stem}"))
    atomic_write_json(path, {"config": key, "seconds": round(time.perf_counter() - t0, 2), "results": res})
    return res


REF_ANSWERS = "reference-answers.pt"  # the reference's kept answers (not mirrored: ~0.3-0.6 GB)


def reference_answers(path: Path, reference, tokenizer, ecfg, results_path: Path, progress: bool = True):
    """The reference's answers kept on ``ecfg``'s items (loaded, or made by one evaluation of the
    reference, which also writes ``results_path`` where missing): every later model's answer-token
    KL then costs an LM-head product instead of a second forward pass."""
    from .evaluate import ReferenceAnswers, evaluate_reference

    if path.exists():
        try:
            return ReferenceAnswers.load(path, reference)
        except (RecoverLoraError, OSError, RuntimeError, KeyError) as e:
            log.warning("%s: %s; keeping the reference's answers again", path, e)
    log.info("study: keeping the reference's answers on %s items a task (%s)", ecfg.limit, path)
    t0 = time.perf_counter()
    res, answers = evaluate_reference(reference, tokenizer, ecfg, progress)
    answers.save(path)
    if not _have(results_path, _eval_key(ecfg, False)):
        atomic_write_json(results_path, {"config": _eval_key(ecfg, False),
                                         "seconds": round(time.perf_counter() - t0, 2), "results": slim(res)})
    return answers


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def load_repaired(run: Run, rcfg: RecoverConfig, degraded):
    """The repaired model from what recover() saved: full-kd's model/, or degraded + adapter/."""
    from .load import load_model

    if rcfg.method == "full-kd":
        return load_model(str(run.dir / "model"), rcfg.load)
    from .provenance import apply_adapter

    return apply_adapter(copy.deepcopy(degraded), run.dir / "adapter")  # NaN/Inf zeroed as recover() did


def _plan_key(rc: dict) -> list:
    """What an auto placement depends on: rank, alpha, budget and the held-out sequences."""
    return [rc["adapter"]["rank"], rc["adapter"]["alpha"], rc.get("placement_budget"), rc.get("heldout_sequences"),
            rc["synth"]["seq_len"], rc["synth"]["seed"], rc.get("reference"), rc.get("degraded")]


def _pool_ready(pool: Path) -> bool:
    """A complete synthetic pool whose shards are on this machine (an unpacked study has only the manifest)."""
    if not (pool / "manifest.json").exists():
        return False
    man = read_json(pool / "manifest.json")
    return bool(man.get("complete")) and all((pool / s["file"]).exists() for s in man.get("shards", []))


def share_plan(run: Run, rcfg: RecoverConfig) -> Path | None:
    """Give an auto-placement run the plan of a sibling run that has one (same model and damage,
    same rank, alpha, budget and held-out data) instead of diagnosing again: the diagnosis is the
    same, and every auto method then adapts the same modules at the same ranks. Only the sibling's
    init and dropout are replaced by this run's. Returns the plan used, or None."""
    if rcfg.placement != "auto" or (run.dir / "diagnosis" / "plan.json").exists():
        return None
    key = _plan_key(rcfg.to_dict())
    for plan in sorted(run.dir.parent.glob("*/diagnosis/plan.json")):
        config = plan.parent.parent / "config.json"  # recover() writes it first; plan.json once diagnosed
        if not config.exists() or _plan_key(read_json(config)) != key:
            continue
        d = read_json(plan)
        d.update(init=rcfg.adapter.init, dropout=rcfg.adapter.dropout)
        atomic_write_json(run.dir / "diagnosis" / "plan.json", d)
        (run.dir / "diagnosis" / "SHARED.txt").write_text(f"plan taken from {plan}\n")
        log.info("study: %s: reusing the placement of %s", run.name, plan.parent.parent.name)
        return plan
    return None


def prepare_plan(run: Run, rcfg: RecoverConfig, reference, degraded, tokenizer, progress: bool = True) -> None:
    """Before runs go out to parallel workers: give an auto-placement run its plan now (a
    sibling's, else diagnose it here, as recover() would), so siblings running side by side share
    one diagnosis instead of each making its own."""
    from .recover import make_heldout, placement_plan

    if rcfg.placement != "auto" or (run.dir / "diagnosis" / "plan.json").exists() or share_plan(run, rcfg):
        return
    log.info("study: %s: diagnosing for the auto placement of its siblings", run.name)
    run.dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run.dir / "config.json", rcfg.to_dict())  # what share_plan matches siblings on
    with timed(run.dir / "timing.json", "recover"):
        placement_plan(rcfg, reference, degraded, tokenizer, make_heldout(rcfg, reference, tokenizer, progress))


def run_one(cfg: StudyConfig, run: Run, reference, degraded, tokenizer, ecfg, ref_res: dict, deg_res: dict,
            pool: Path | None, progress: bool = True, jobs: int = 1, acfg=None, ref_acc: dict | None = None,
            deg_acc: dict | None = None, answers=None) -> dict:
    """Recover (or resume), evaluate the repaired model (the measures of ``ecfg``, and accuracy on
    ``acfg``'s items for a headline method), and write ``done.json``. ``jobs``: how many runs shared
    the device meanwhile (recorded: their minutes are wall time while sharing). ``answers``: the
    reference's kept answers, for the answer-token KL."""
    from .report import compute_measures

    rcfg = cfg.recover_config(run.model, run.damage, run.method, pool)
    timing = run.dir / "timing.json"
    if not (run.dir / "report.json").exists():
        log.info("study: %s: recover (%s)", run.name, rcfg.method)
        share_plan(run, rcfg)
        with timed(timing, "recover"):
            run_recover(rcfg, reference, copy.deepcopy(degraded), tokenizer, progress=progress)
    rep = read_json(run.dir / "report.json")
    repaired = {}

    def get_repaired():  # loaded once, only if an evaluation is not cached yet
        if "m" not in repaired:
            repaired["m"] = load_repaired(run, rcfg, degraded)
        return repaired["m"]

    # headline rows: one evaluation on the accuracy items (with the answer-token KL, from the
    # reference's kept answers), the measures being its first items; the others: the measures only
    kl = answers if cfg.eval.get("answer_kl") else None
    meas, accp = run.dir / "eval" / "recovered.json", run.dir / "eval" / "recovered-accuracy.json"
    headline = acfg is not None and run.method in (cfg.accuracy or {}).get("methods", [])
    with timed(timing, "eval"):
        rec_acc = None
        if headline:
            need_kl = kl is not None and not _have(meas, _eval_key(ecfg, True))
            rec_acc = cached_eval(accp, get_repaired, tokenizer, acfg, progress, reference=kl if need_kl else None)
        rec_res = cached_eval(meas, get_repaired, tokenizer, ecfg, progress, reference=kl,
                              source=accp if headline else None)
    if rec_acc is not None:
        summary = build_report(pool_mmlu(ref_acc), pool_mmlu(deg_acc), pool_mmlu(rec_acc), run.dir / "eval")
    else:
        summary = build_report(pool_mmlu(ref_res), pool_mmlu(deg_res), pool_mmlu(rec_res), run.dir / "eval")
    measures = compute_measures(pool_mmlu(ref_res), pool_mmlu(rec_res))
    secs = read_json(timing)
    done = {"model": run.model, "damage": run.damage, "method": run.method, "spec": rcfg.reference,
            "recover_method": rcfg.method, "placement": rcfg.placement,
            "init": rep.get("init"), "trainable_parameters": rep["trainable_parameters"],
            "train_tokens": rep["train_tokens"], "steps": rep["steps"],
            "synthetic_sequences": rep["synthetic_sequences"], "shared_pool": pool is not None,
            "gpu_minutes": round(secs.get("recover", 0.0) / 60, 3), "eval_minutes": round(secs.get("eval", 0.0) / 60, 3),
            "cpu_minutes": {"recover": round(secs.get("recover_cpu", 0.0) / 60, 3),
                            "eval": round(secs.get("eval_cpu", 0.0) / 60, 3)},
            "concurrent_runs": jobs,
            "device_name": rep.get("device_name"), "heldout": rep["heldout"],
            "gap_closed": summary["average"]["gap_closed"], "recovered_points": summary["average"]["recovered_points"],
            "resolved_gap_closed": (summary.get("resolved_average") or {}).get("gap_closed"),
            "accuracy_items": "accuracy" if rec_acc is not None else "measures",
            "agreement": measures["average"]["agreement"], "answer_kl": measures["average"]["answer_kl"],
            "config": rcfg.to_dict()}
    atomic_write_json(run.dir / "done.json", done)
    (run.dir / "checkpoint.pt").unlink(missing_ok=True)  # finished: only a resume needed it (full-kd: GBs)
    if cfg.mirror:  # a study that lands run by run: its RESULTS.md too
        try:
            write_results(cfg.study_dir, cfg.results, cfg)
        except Exception as e:  # noqa: BLE001 - a reporting problem must not stop the runs
            log.warning("study: RESULTS.md not updated after %s: %s", run.name, e)
    mirror_results(cfg)
    log.info("study: %s done: gap closed %s", run.name, _pct(done["gap_closed"]))
    return done


def _execute(cfg: StudyConfig, todo: list[Run], progress: bool = True, mode: str = "run", jobs: int = 1,
             deadline: float | None = None) -> None:
    """Go through ``todo`` (grouped by model, then damage), loading each reference and making each
    degraded model only when a run needs it. ``mode``: ``run`` runs them all; ``prepare`` does only
    what parallel runs share (reference and degraded evaluations, the synthetic pool, the auto
    placement's diagnosis); ``claim`` (a worker) runs those it claims first (:func:`claim`). No run
    starts after ``deadline`` (``time.time()``): those left wait for the next invocation."""
    import torch

    from .degrade import degrade
    from .load import load_model, load_tokenizer
    from .synth import synthesize

    study = Path(cfg.study_dir)
    ecfg, acfg = eval_config(cfg), accuracy_config(cfg)
    kl = bool(cfg.eval.get("answer_kl"))
    common = RecoverConfig.from_dict(cfg.recover)
    ref_acc = deg_acc = answers = None
    model = damage = reference = degraded = None
    for run in todo:
        if deadline is not None and mode != "prepare" and time.time() > deadline:
            log.info("study: --stop-after reached; %s and the runs after it are left for the next call", run.name)
            break
        if mode == "claim" and not claim(run):
            continue
        if run.model != model:
            model, damage, reference, degraded = run.model, None, None, None
            log.info("study: loading %s (%s)", model, cfg.models[model])
            reference = load_model(cfg.models[model], common.load)
            tokenizer = load_tokenizer(cfg.models[model], common.load)
            ev = study / slug(model) / "eval"
            with locked(ev / ".lock"):
                # the reference's answers are kept on the largest item set; every evaluation after
                # it takes the answer-token KL from them (the measures' items are the first of those)
                answers = reference_answers(ev / REF_ANSWERS, reference, tokenizer, acfg or ecfg,
                                            ev / ("reference-accuracy.json" if acfg else "reference.json"),
                                            progress) if kl else None
                if acfg is not None:
                    ref_acc = cached_eval(ev / "reference-accuracy.json", lambda m=reference: m, tokenizer, acfg,
                                          progress)
                ref_res = cached_eval(ev / "reference.json", lambda m=reference: m, tokenizer, ecfg, progress,
                                      source=ev / "reference-accuracy.json" if acfg else None)
            mirror_results(cfg)
        if run.damage != damage:
            damage, degraded = run.damage, None
            degraded = copy.deepcopy(reference)
            degrade(degraded, degrade_config(cfg, damage, model))
            dv = study / slug(model) / slug(damage) / "eval"
            with locked(dv / ".lock"):
                if acfg is not None:
                    need_kl = kl and not _have(dv / "degraded.json", _eval_key(ecfg, True))
                    deg_acc = cached_eval(dv / "degraded-accuracy.json", lambda m=degraded: m, tokenizer, acfg,
                                          progress, reference=answers if need_kl else None)
                deg_res = cached_eval(dv / "degraded.json", lambda m=degraded: m, tokenizer, ecfg, progress,
                                      reference=answers, source=dv / "degraded-accuracy.json" if acfg else None)
            mirror_results(cfg)
        pool = None
        if cfg.uses_pool(run.method):
            pool = study / slug(model) / "synth"
            with locked(study / slug(model) / ".synth.lock"):
                if not _pool_ready(pool):
                    with timed(study / slug(model) / "timing.json", "synth_pool"):
                        synthesize(reference, tokenizer, train_synth_config(common), pool, progress=progress)
        if mode == "prepare":
            prepare_plan(run, cfg.recover_config(model, damage, run.method, pool), reference, degraded, tokenizer,
                         progress)
        else:
            (run.dir / FAILED).unlink(missing_ok=True)  # a failed run is tried again at each invocation
            try:
                run_one(cfg, run, reference, degraded, tokenizer, ecfg, ref_res, deg_res, pool, progress, jobs,
                        acfg, ref_acc, deg_acc, answers)
            except Exception as e:  # noqa: BLE001 - any error of one run (a bug in one method too)
                # one bad run must not stop days of unattended runs: record it, go on with the next
                import traceback

                log.error("study: %s failed (%s: %s); going on with the next run", run.name, type(e).__name__, e)
                run.dir.mkdir(parents=True, exist_ok=True)
                atomic_write_json(run.dir / FAILED, {"error": f"{type(e).__name__}: {e}",
                                                     "traceback": traceback.format_exc()[-4000:]})
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def eval_config(cfg: StudyConfig):
    from .evaluate import EvalConfig

    return EvalConfig(tasks=cfg.eval["tasks"], data_dir=cfg.eval.get("data_dir"), limit=cfg.eval.get("limit"))


def accuracy_config(cfg: StudyConfig):
    """The evaluation of the headline rows on more items (``accuracy.limit``), or None."""
    if not cfg.accuracy:
        return None
    from .evaluate import EvalConfig

    return EvalConfig(tasks=cfg.eval["tasks"], data_dir=cfg.eval.get("data_dir"), limit=cfg.accuracy.get("limit"))


MIRROR_MAX_BYTES = 4_000_000


def seed_from_mirror(cfg: StudyConfig) -> int:
    """On a fresh checkout (or machine), bring the mirrored result files back into the study folder
    before running, so that finished runs and cached evaluations are not redone. Files already in
    the study folder win. Returns the number of files copied."""
    import shutil

    if not cfg.mirror or not Path(cfg.mirror).is_dir():
        return 0
    src, root = Path(cfg.mirror), Path(cfg.study_dir)
    n = 0
    for f in _small_files(src):
        t = root / f.relative_to(src)
        if not t.exists():
            t.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, t)
            n += 1
    if n:
        log.info("study: %d result files brought back from %s", n, src)
    return n


def mirror_results(cfg: StudyConfig) -> int:
    """Copy the small result files of the study folder (what :func:`pack_results` packs) to
    ``cfg.mirror``, a folder in the repository, so each finished piece can be committed at once.
    Returns the number of files copied (only new or changed ones)."""
    import shutil

    if not cfg.mirror:
        return 0
    root, dest = Path(cfg.study_dir), Path(cfg.mirror)
    n = 0
    for f in _small_files(root):
        if f.stat().st_size > MIRROR_MAX_BYTES:
            continue
        t = dest / f.relative_to(root)
        if t.exists() and t.stat().st_size == f.stat().st_size and t.read_bytes() == f.read_bytes():
            continue
        t.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, t)
        n += 1
    return n


CLAIM = ".claim"  # in a run folder while a parallel worker has it
FAILED = "failed.json"  # in a run folder whose last attempt raised: the error, tried again next time


def claim(run: Run) -> bool:
    """Atomically take ``run`` for this worker process; False if another worker has it or it is done."""
    import os

    if run.status() == "done":
        return False
    run.dir.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(run.dir / CLAIM, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.write(fd, f"{os.getpid()}\n".encode())
    os.close(fd)
    return True


def run_workers(cfg: StudyConfig, todo: list[Run], jobs: int, progress: bool = True,
                deadline: float | None = None) -> None:
    """Run ``todo`` in ``jobs`` worker processes side by side on this machine (one device shared):
    what the runs share is made first, here; each worker then claims runs one at a time, loading
    models as it needs them, and logs to ``study_dir/logs/worker-K.log``. A run a worker was on
    when it failed or was interrupted stays unfinished and resumes at the next invocation."""
    import os
    import signal
    import subprocess
    import sys

    from tqdm.auto import tqdm

    _execute(cfg, todo, progress, mode="prepare")
    study = Path(cfg.study_dir)
    for run in todo:  # claims left by an earlier, interrupted invocation
        (run.dir / CLAIM).unlink(missing_ok=True)
    atomic_write_json(study / "queue.json", {"jobs": jobs, "deadline": deadline, "runs": [r.name for r in todo]})
    (study / "logs").mkdir(exist_ok=True)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))  # no CPU oversubscription
    src = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    procs, logs = [], []
    for k in range(jobs):
        logs.append(open(study / "logs" / f"worker-{k}.log", "a"))
        procs.append(subprocess.Popen([sys.executable, "-m", "recover_lora.cli", "study", "--worker", str(study)],
                                      stdout=logs[-1], stderr=subprocess.STDOUT, env=env))
    log.info("study: %d runs on %d workers (logs in %s)", len(todo), jobs, study / "logs")
    bar = tqdm(total=len(todo), desc="study runs", unit="run", disable=not progress)
    try:
        while any(p.poll() is None for p in procs):
            time.sleep(2)
            bar.n = sum(r.status() == "done" for r in todo)
            bar.refresh()
    except BaseException:  # Ctrl-C / SIGTERM: let every worker save its checkpoint, then stop
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=120)
            except subprocess.TimeoutExpired:
                p.kill()
        raise
    finally:
        bar.n = sum(r.status() == "done" for r in todo)
        bar.close()
        for f in logs:
            f.close()
        for run in todo:
            (run.dir / CLAIM).unlink(missing_ok=True)
    failed = [k for k, p in enumerate(procs) if p.returncode != 0]
    left = [r.name for r in todo if r.status() != "done"]
    if failed or (left and (deadline is None or time.time() < deadline)):
        raise RecoverLoraError(f"study workers {failed} failed (see {study / 'logs'}); unfinished runs: {left}")


def worker_main(study_dir: str | Path) -> int:
    """``recover-lora study --worker STUDY_DIR``: one of :func:`run_workers`' processes."""
    study = Path(study_dir)
    cfg = StudyConfig(**read_json(study / "study.json"))
    runs = {r.name: r for r in plan(cfg)}
    queue = read_json(study / "queue.json")
    _execute(cfg, [runs[n] for n in queue["runs"]], progress=False, mode="claim", jobs=queue["jobs"],
             deadline=queue.get("deadline"))
    return 0


def run_study(cfg: StudyConfig, only: list[str] | None = None, dry_run: bool = False, progress: bool = True,
              command: str | None = None, jobs: int = 1, stop_after: float | None = None) -> list[Run]:
    """Run every selected, unfinished run (see the module docstring), ``jobs`` at a time, starting
    none after ``stop_after`` seconds (a device lease: what is started should finish); then write
    RESULTS.md."""
    deadline = time.time() + stop_after if stop_after is not None else None
    runs = plan(cfg, only)
    if not runs:
        raise RecoverLoraError(f"--only {only} selects no run; models {list(cfg.models)}, damages "
                               f"{list(cfg.damages)}, methods {list(cfg.all_methods())}")
    if jobs < 1:
        raise RecoverLoraError(f"--jobs must be at least 1, not {jobs}")
    print(describe_plan(cfg, runs), flush=True)
    if dry_run:
        return runs
    study = Path(cfg.study_dir)
    study.mkdir(parents=True, exist_ok=True)
    if seed_from_mirror(cfg):
        runs = plan(cfg, only)
    atomic_write_json(study / "study.json", asdict(cfg))
    with open(study / "commands.log", "a") as f:
        f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')}\t{device_name()}\t{command or 'run_study()'}\n")
    todo = [r for r in runs if r.status() != "done"]
    if jobs > 1 and len(todo) > 1:
        run_workers(cfg, todo, min(jobs, len(todo)), progress, deadline)
    else:
        _execute(cfg, todo, progress, deadline=deadline)
    write_results(cfg.study_dir, cfg.results, cfg)
    mirror_results(cfg)
    failed = [r.name for r in runs if (r.dir / FAILED).exists()]
    if failed:
        raise RecoverLoraError(f"{len(failed)} run(s) failed, the others went on: {', '.join(failed)} "
                               f"(errors in each run's {FAILED}; the next call tries them again)")
    return runs


# ---------------------------------------------------------------------------------- RESULTS.md

def pool_mmlu(results: dict) -> dict:
    """Results with the MMLU subjects pooled into one 'mmlu' task (items concatenated), in place of the first."""
    from .report import task_results, item_array

    res = task_results(results)
    subj = [t for t in res if t.startswith("mmlu_")]
    if len(subj) < 2:
        return res
    items = {m: np.concatenate([item_array(res[s]["items"][m]) for s in subj])
             for m in ("acc", "acc_norm", "pred", "pred_norm", "answer_kl")
             if all(m in res[s].get("items", {}) for s in subj)}
    n = sum(res[s].get("n", 0) for s in subj)
    entry = {m: float(np.mean(v)) for m, v in items.items() if m in ("acc", "acc_norm", "answer_kl")}
    for m in ("acc", "acc_norm"):
        if m not in entry and all(m in res[s] for s in subj):
            entry[m] = sum(res[s][m] * res[s].get("n", 1) for s in subj) / max(n, 1)
    entry.update(n=n, items=items)
    out = {}
    for t, r in res.items():
        if t == subj[0]:
            out["mmlu"] = entry
        elif t not in subj:
            out[t] = r
    return out


def _pct(x, ci=None) -> str:
    if x is None:
        return "n/a"
    s = f"{100 * x:.0f}%"
    return s + (f" [{100 * ci[0]:.0f}, {100 * ci[1]:.0f}]" if ci else "")


def _pts(x, ci=None) -> str:
    if x is None:
        return "n/a"
    return f"{x:+.1f}" + (f" [{ci[0]:+.1f}, {ci[1]:+.1f}]" if ci else "")


def _gpu_min(done: dict) -> str:
    """GPU minutes of a run; runs that shared the device (``study --jobs``) say with how many."""
    n = done.get("concurrent_runs", 1)
    return f"{done['gpu_minutes']:.1f}" + (f" ({n} sharing)" if n > 1 else "")


def _minutes(done: dict) -> str:
    """train + eval minutes of a run: CPU minutes (all threads) on a CPU, wall minutes on a GPU."""
    cpu = done.get("cpu_minutes")
    if cpu and done.get("device_name") == "cpu":
        n = done.get("concurrent_runs", 1)
        return f"{cpu['recover']:.1f} + {cpu['eval']:.1f} CPU" + (f" ({n} sharing)" if n > 1 else "")
    return f"{_gpu_min(done)} + {done.get('eval_minutes', 0):.1f}"


def _num(n) -> str:
    if n is None:
        return "n/a"
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def _read_results(path: Path) -> dict | None:
    return pool_mmlu(read_json(path)["results"]) if path.exists() else None


def collect(study_dir: Path, cfg: dict) -> dict:
    """{(model, damage): {...}} of the finished runs: the reference's and degraded model's results
    (``ref``/``deg``: the measures' items; ``ref_acc``/``deg_acc``: the accuracy items, if run) and
    per method {"done", "report" (accuracy tier where run, else the measures' items), "acc_tier",
    "measures" (agreement and answer-token KL to the reference)}."""
    from .report import compute_measures

    rcfg = ReportConfig()
    out = {}
    scfg = StudyConfig(**cfg)
    by_pair: dict[tuple[str, str], list[str]] = {}
    for r in plan(scfg):
        by_pair.setdefault((r.model, r.damage), []).append(r.method)
    for (model, damage), methods in by_pair.items():
        mdir, ddir = study_dir / slug(model), study_dir / slug(model) / slug(damage)
        ref, deg = _read_results(mdir / "eval" / "reference.json"), _read_results(ddir / "eval" / "degraded.json")
        ref_acc = _read_results(mdir / "eval" / "reference-accuracy.json")
        deg_acc = _read_results(ddir / "eval" / "degraded-accuracy.json")
        dirs = {m: ddir / slug(m) for m in methods if (ddir / slug(m) / "done.json").exists()}
        if ref is None or deg is None:
            continue
        runs = {}
        for m, d in dirs.items():
            rec = _read_results(d / "eval" / "recovered.json")
            rec_acc = _read_results(d / "eval" / "recovered-accuracy.json")
            acc_tier = rec_acc is not None and ref_acc is not None and deg_acc is not None
            rep = compute_report(ref_acc, deg_acc, rec_acc, rcfg) if acc_tier else compute_report(ref, deg, rec, rcfg)
            runs[m] = {"done": read_json(d / "done.json"), "report": rep, "acc_tier": acc_tier,
                       "measures": compute_measures(ref, rec, rcfg)}
        out[(model, damage)] = {"ref": ref, "deg": deg, "ref_acc": ref_acc, "deg_acc": deg_acc, "runs": runs,
                                "deg_measures": compute_measures(ref, deg, rcfg), "methods": methods,
                                "acc_report": (compute_report(ref_acc, deg_acc, deg_acc, rcfg)
                                               if ref_acc is not None and deg_acc is not None else None)}
    return out


def goal_methods(goals: dict) -> list[str]:
    """The method(s) the goals are checked for: ``goals.method`` is one name or a list."""
    m = goals["method"]
    return [m] if isinstance(m, str) else list(m)


def kl_closed(done: dict) -> float | None:
    """Share of the held-out KL removed: 1 - after / before."""
    h = done.get("heldout") or {}
    b, a = (h.get("before") or {}).get("kl"), (h.get("after") or {}).get("kl")
    return None if b is None or a is None or b <= 0 else 1 - a / b


def check_goals(runs: dict, goals: dict) -> dict[str, tuple[str, str]]:
    """The study issue's goals for one (model, damage): {goal: (PASS | FAIL | n/a, detail)}.
    ``runs``: method -> {"done", "report", "measures"} (:func:`collect`)."""
    best = goals["method"]
    need = goals.get("min_gap_closed", 0.9)
    if best not in runs:
        na = ("n/a", f"{best} not run")
        return {k: na for k in ("kl", "gap", "presets", "baselines", "no_worse")}
    r = runs[best]
    out: dict[str, tuple[str, str]] = {}
    kc = kl_closed(r["done"])
    out["kl"] = ("n/a", "no held-out KL") if kc is None else ("PASS" if kc >= need else "FAIL", _pct(kc))
    res = r["report"].get("resolved_average")
    if not res or res.get("gap_closed") is None:
        out["gap"] = ("n/a", "no task's accuracy gap resolved (CI of reference - degraded includes 0)")
    else:
        g, ci = res["gap_closed"], (res.get("ci") or {}).get("gap_closed")
        out["gap"] = ("PASS" if g >= need else "FAIL", f"{_pct(g, ci)} over {', '.join(res['tasks'])}")

    def after(m):
        return runs[m]["done"]["heldout"]["after"]["kl"]

    def akl(m):
        return runs[m]["measures"]["average"].get("answer_kl")

    for key, names, strict in (("presets", goals.get("presets", []), False), ("baselines", goals.get("baselines", []), True)):
        missing = [n for n in names if n not in runs]
        if missing:
            out[key] = ("n/a", f"missing {', '.join(missing)}")
            continue
        ok = all(after(best) < after(n) if strict else after(best) <= after(n) for n in names)
        if strict:  # beating a baseline: on the answer tokens of the benchmarks too, where measured
            ok = ok and all(akl(best) is None or akl(n) is None or akl(best) < akl(n) for n in names)
        out[key] = ("PASS" if ok else "FAIL", ", ".join(f"{n} {after(n):.3f}" for n in names) or "none named")
    worse = []  # a task moved farther from the reference than the degraded model was, beyond its CI
    for m, v in runs.items():
        if not v.get("acc_tier"):
            continue
        rep = v["report"]
        for t in rep["task_order"]:
            ci = (rep["tasks"][t].get("ci") or {}).get("distance_closed")
            if ci and ci[1] < 0:
                worse.append(f"{m}: {t} {_pts(rep['tasks'][t]['distance_closed'], ci)} (distance to the reference)")
    checked = sum(bool(v.get("acc_tier")) for v in runs.values())
    out["no_worse"] = (("FAIL" if worse else "PASS") if checked else "n/a",
                       "; ".join(worse) if worse else f"{checked} methods with accuracy checked")
    return out


def plot_kl(model: str, damages: list[str], methods: list[str], data: dict, path: Path) -> Path:
    """Grouped bars: held-out KL to the reference after each method (the degraded model first),
    one bar per damage, log scale."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["degraded"] + methods
    fig, ax = plt.subplots(figsize=(max(6.0, 0.8 * len(names) + 2), 4))
    w = 0.8 / max(1, len(damages))
    x = np.arange(len(names))
    for i, dmg in enumerate(damages):
        runs = data.get((model, dmg), {}).get("runs", {})
        before = next((v["done"]["heldout"]["before"]["kl"] for v in runs.values()), np.nan)
        vals = [before] + [runs[m]["done"]["heldout"]["after"]["kl"] if m in runs else np.nan for m in methods]
        ax.bar(x + (i - (len(damages) - 1) / 2) * w, vals, w, label=dmg)
    ax.set_yscale("log")
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("held-out KL to the reference (log)")
    ax.set_title(f"{model}: held-out KL after each repair (lower is better)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def _m(x, ci=None, pct=False, digits=3) -> str:
    if x is None:
        return "n/a"
    if pct:
        return f"{100 * x:.1f}%" + (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "")
    return f"{x:.{digits}f}" + (f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if ci else "")


def write_results(study_dir: str | Path, out: str | Path = "RESULTS.md", cfg: StudyConfig | dict | None = None) -> Path:
    """RESULTS.md (and one chart per model in ``<out's folder>/results/``) from the finished runs."""
    import os

    study_dir, out = Path(study_dir), Path(out)
    if cfg is None:
        if not (study_dir / "study.json").exists():
            raise RecoverLoraError(f"{study_dir}/study.json not found: run the study (or --dry-run is not enough)")
        cfg = read_json(study_dir / "study.json")
    cfg = asdict(cfg) if isinstance(cfg, StudyConfig) else cfg
    scfg = StudyConfig(**cfg)
    all_methods = scfg.all_methods()
    goals = cfg["goals"]
    data = collect(study_dir, cfg)
    dones = [v["done"] for e in data.values() for v in e["runs"].values()]
    devices = sorted({d.get("device_name") or "?" for d in dones})
    n_total = len(plan(scfg))
    ev, acc = cfg["eval"], cfg.get("accuracy") or {}
    L = ["# Study results", "",
         f"{len(dones)} of {n_total} planned runs finished, from `{os.path.relpath(study_dir, out.parent)}`. "
         f"Device: {', '.join(devices) or 'n/a'}.", "",
         "Measures of every run, against the reference: the **held-out KL** (KL(reference || model) per token on "
         "held-out synthetic sequences, before -> after, and the share of it removed) and its top-1 agreement; on "
         f"the benchmark items ({ev.get('limit') or 'all'} a task, MMLU = its three subjects pooled): the "
         "**agreement** with the reference's choices (share of items where the model picks what the reference "
         "picks, under the task's metric) and the **answer-token KL** (KL(reference || model) averaged over the "
         "tokens of every choice of an item). Both resolve differences that accuracy on a few hundred items "
         "cannot; brackets are 95% bootstrap CIs over items (mean over tasks).", "",
         f"Accuracy (acc_norm where the task defines it, else acc) on {acc.get('limit') or 'the same'} items a "
         "task for the reference, the degraded model and the headline methods: a task's gap is *resolved* when the "
         "95% paired-bootstrap CI of reference - degraded excludes zero; *gap closed* = the share of the distance to "
         "the reference closed, sum |ref - deg| - |ref - rep| over sum |ref - deg|, over the resolved tasks only (the "
         "others are named, not averaged in): (repaired - degraded) / (reference - degraded) when the damage lowered "
         "every task, and still right when it lifted one above the reference (BoolQ under noise); a task is *worse* "
         "when the repaired model is farther from the reference than the degraded one, beyond its CI. "
         "*minutes*: of `recover` (data of its own, training, saving) and of the run's evaluations; on a CPU "
         "the process's CPU minutes (all threads; time spent waiting does not count), on a GPU wall minutes; "
         "*synthetic tokens*: tokens distilled on.", ""]
    names = goal_methods(goals)
    L += ["## Goals", "",
          f"For {' and '.join(f'`{m}`' for m in names)}: (1) removes >= {100 * goals.get('min_gap_closed', 0.9):.0f}% "
          f"of the held-out KL; (2) closes >= {100 * goals.get('min_gap_closed', 0.9):.0f}% of the resolved accuracy "
          f"gap; (3) held-out KL no worse than the presets ({', '.join(goals.get('presets', [])) or 'none named'}); "
          f"(4) beats {', '.join(goals.get('baselines', [])) or 'none named'} on held-out and answer-token KL; (5) no "
          "repaired model (any method with accuracy) is worse than the degraded one on any task beyond its CI.", "",
          "| model | damage | method | (1) KL removed | (2) resolved gap closed | (3) >= presets | (4) beats baselines | (5) none worse |",
          "|---|---|---|---|---|---|---|---|"]
    for (model, damage), v in data.items():
        for m in names:
            if m not in v["methods"]:
                continue
            g = check_goals(v["runs"], {**goals, "method": m})
            L.append(f"| {model} | {damage} | {m} | " + " | ".join(
                f"**{g[k][0]}** {g[k][1]}" for k in ("kl", "gap", "presets", "baselines", "no_worse")) + " |")
    if not data:
        L.append("| - | - | - | no finished run | | | | |")
    L.append("")
    for model, spec in cfg["models"].items():
        keys = [k for k in data if k[0] == model]
        if not keys:
            continue
        methods = list(dict.fromkeys(m for k in keys for m in data[k]["methods"]))
        chart = out.parent / "results" / f"{slug(model)}-heldout-kl.png"
        plot_kl(model, [k[1] for k in keys], methods, data, chart)
        L += [f"## {model} (`{spec}`)", "", f"![held-out KL]({os.path.relpath(chart, out.parent)})", ""]
        timing = study_dir / slug(model) / "timing.json"
        if timing.exists() and (study_dir / slug(model) / "synth" / "manifest.json").exists():
            man = read_json(study_dir / slug(model) / "synth" / "manifest.json")
            L += [f"Shared synthetic data pool: {man['num_sequences']:,} x {man['seq_len']} tokens, "
                  f"{read_json(timing).get('synth_pool', 0) / 60:.1f} min.", ""]
        for _, damage in keys:
            v = data[(model, damage)]
            ops = ((cfg.get("damage_overrides") or {}).get(model) or {}).get(damage, cfg["damages"][damage])
            L += [f"### {damage}: `{'; '.join(map(str, ops))}`", "",
                  "| method | held-out KL: before -> after (removed) | held-out top-1 | agreement with the reference | "
                  "answer-token KL | trainable params | synthetic tokens | minutes (train + eval) |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
            dm = v["deg_measures"]["average"]
            first = next(iter(v["runs"].values()), None)
            hb = first["done"]["heldout"]["before"] if first else {}
            L.append(f"| degraded | {_m(hb.get('kl'))} | {_m(hb.get('top1'), pct=True)} | "
                     f"{_m(dm['agreement'], dm['agreement_ci'], pct=True)} | {_m(dm['answer_kl'], dm['answer_kl_ci'])} "
                     "| - | - | - |")
            for m, r in v["runs"].items():
                done, ms = r["done"], r["measures"]["average"]
                h = done["heldout"]
                tokens = (f"0 (labeled: {_num(done['train_tokens'])})" if done.get("recover_method") == "sft-lora"
                          else _num(done["train_tokens"]))
                L.append(f"| {m} | {h['before']['kl']:.3f} -> {h['after']['kl']:.3f} ({_pct(kl_closed(done))}) | "
                         f"{_m(h['after'].get('top1'), pct=True)} | {_m(ms['agreement'], ms['agreement_ci'], pct=True)} | "
                         f"{_m(ms['answer_kl'], ms['answer_kl_ci'])} | {_num(done['trainable_parameters'])} | {tokens} | "
                         f"{_minutes(done)} |")
            L.append("")
            acc_runs = {m: r for m, r in v["runs"].items() if r["acc_tier"]}
            shown = acc_runs or v["runs"]
            if not shown:
                continue
            rep0 = next(iter(shown.values()))["report"]
            tasks = rep0["task_order"]
            n_items = ", ".join(f"{t} {rep0['tasks'][t]['n']}" for t in tasks)
            L += [f"Accuracy (%), items: {n_items}; resolved tasks in bold." + ("" if acc_runs else
                  " (These are the measures' items: no accuracy run on more items yet.)"), "",
                  "| accuracy (%) | " + " | ".join(f"**{t}**" if rep0["tasks"][t].get("resolved") else t for t in tasks)
                  + " | avg | avg, resolved |", "|---|" + "---:|" * (len(tasks) + 2)]
            ra = rep0.get("resolved_average") or {}
            for who in ("reference", "degraded"):
                L.append(f"| {who} | " + " | ".join(f"{rep0['tasks'][t][who]:.1f}" for t in tasks)
                         + f" | {rep0['average'][who]:.1f} | {_m(ra.get(who), digits=1)} |")
            for m, r in shown.items():
                rep = r["report"]
                rr = rep.get("resolved_average") or {}
                L.append(f"| {m} | " + " | ".join(f"{rep['tasks'][t]['recovered']:.1f}" for t in tasks)
                         + f" | {rep['average']['recovered']:.1f} | {_m(rr.get('recovered'), digits=1)} |")
            L += ["", "| method | distance closed, resolved avg (pts) | gap closed, resolved | gap closed, all tasks | worst task (distance closed, pts) |",
                  "|---|---:|---:|---:|---|"]
            for m, r in shown.items():
                rep = r["report"]
                rr, a = rep.get("resolved_average") or {}, rep["average"]
                rci, aci = rr.get("ci") or {}, a.get("ci") or {}
                wt = min(tasks, key=lambda t: rep["tasks"][t]["distance_closed"])
                wci = (rep["tasks"][wt].get("ci") or {}).get("distance_closed")
                L.append(f"| {m} | {_pts(rr.get('points_closed'), rci.get('points_closed'))} | "
                         f"{_pct(rr.get('gap_closed'), rci.get('gap_closed'))} | {_pct(a['gap_closed'], aci.get('gap_closed'))} | "
                         f"{wt} {_pts(rep['tasks'][wt]['distance_closed'], wci)} |")
            if rep0.get("unresolved"):
                L.append(f"\nGap not resolved (not averaged in): {', '.join(rep0['unresolved'])}.")
            L.append("")
    if any(d.get("recover_method") == "sft-lora" for d in dones):
        L += ["sft-lora trains on labeled train splits (ARC-Easy, ARC-Challenge, OpenBookQA, PIQA by default); "
              "HellaSwag, WinoGrande, BoolQ and MMLU ship no train split here, so on those it could not train "
              "in-task and is measured out of task.", ""]
    L += ["## Methods", "", "| method | RecoverConfig overrides |", "|---|---|"]
    L += [f"| {m} | `{yaml.safe_dump(o, default_flow_style=True, width=1000).strip()}` |" for m, o in all_methods.items()]
    L += ["", f"Common settings: `{yaml.safe_dump(cfg['recover'], default_flow_style=True, width=1000).strip()}`; "
          f"measures: `{yaml.safe_dump({k: ev.get(k) for k in ('tasks', 'limit', 'answer_kl')}, default_flow_style=True, width=1000).strip()}`; "
          f"accuracy: `{yaml.safe_dump(acc, default_flow_style=True, width=1000).strip()}`; damage seed {cfg['damage_seed']}.", ""]
    log_p = study_dir / "commands.log"
    if log_p.exists():
        cmds = dict.fromkeys(line.split("\t", 2)[-1].strip() for line in log_p.read_text().splitlines() if line.strip())
        L += ["## Commands", "", "Every invocation that ran part of the study (time, device and command are in "
              f"`{os.path.relpath(log_p, out.parent)}`):", "", "```"] + list(cmds) + ["```", ""]
    atomic_write_bytes(out, "\n".join(L).encode())
    return out


# ---------------------------------------------------------------------------------- CLI

# What RESULTS.md and a later session need from study_dir; models, adapters, data and checkpoints stay.
PACK_SUFFIXES = (".json", ".md", ".png", ".log", ".txt", ".yaml")
PACK_SKIP_DIRS = {"model", "adapter", "merged"}  # (tokenizer.json alone is 3.5 MB); data shards are .pt


def _small_files(root: Path) -> list[Path]:
    return sorted(f for f in root.rglob("*") if f.is_file() and f.suffix in PACK_SUFFIXES
                  and not PACK_SKIP_DIRS & set(f.relative_to(root).parts[:-1]) and not f.name.startswith("."))


def pack_results(study_dir: str | Path, archive: str | Path) -> int:
    """Write the small result files of ``study_dir`` (JSON, MD, PNG, logs) into one ``.tar.gz``:
    the GPU machine returns at most 8 files a call. Returns the number of files packed."""
    import tarfile

    root = Path(study_dir)
    if not root.is_dir():
        raise RecoverLoraError(f"no study folder {root}")
    files = _small_files(root)
    Path(archive).parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w:gz") as tar:
        for f in files:
            tar.add(f, arcname=str(f.relative_to(root)))
    return len(files)


def unpack_results(archive: str | Path, study_dir: str | Path) -> int:
    """Merge a :func:`pack_results` archive into ``study_dir`` (newer files win). Returns the count."""
    import tarfile

    root = Path(study_dir)
    root.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = [m for m in tar.getmembers() if m.isfile()]
            tar.extractall(root, members=members, filter="data")  # refuses absolute paths and '..'
    except (OSError, tarfile.TarError) as e:
        raise RecoverLoraError(f"cannot unpack {archive}: {e}") from None
    return len(members)


def run_cli(a) -> int:
    """``recover-lora study`` (``commands.StudyCmd``)."""
    if a.worker:
        return worker_main(a.worker)
    if not a.config:
        raise RecoverLoraError("study needs --config STUDY.yaml")
    cfg = StudyConfig.from_yaml(a.config)
    if a.results:
        cfg.results = a.results
    if a.eval.data_dir:
        cfg.eval["data_dir"] = a.eval.data_dir
    only = [s for o in a.only for s in o.split(",") if s] if a.only else None
    if getattr(a, "unpack", None):
        n = unpack_results(a.unpack, cfg.study_dir)
        print(f"unpacked {n} files into {cfg.study_dir}")
        a.results_only = True
    from .utils import sigterm_as_interrupt

    try:
        with sigterm_as_interrupt():  # SIGTERM (a `timeout` around the command) ends the runs as Ctrl-C does
            if a.results_only:
                print(f"wrote {write_results(cfg.study_dir, cfg.results, cfg)}")
            else:
                argv = ["recover-lora", "study", "--config", a.config] + (["--only", *a.only] if a.only else [])
                argv += ["--jobs", str(a.jobs)] if a.jobs != 1 else []
                argv += ["--stop-after", str(a.stop_after)] if a.stop_after is not None else []
                run_study(cfg, only, dry_run=a.dry_run, command=" ".join(shlex.quote(x) for x in argv), jobs=a.jobs,
                          stop_after=a.stop_after)
                if not a.dry_run:
                    print(f"wrote {cfg.results}")
    finally:  # whatever finished comes back, also from an interrupted or failed call
        if getattr(a, "pack", None) and not a.dry_run and Path(cfg.study_dir).is_dir():
            print(f"packed {pack_results(cfg.study_dir, a.pack)} files into {a.pack}")
    return 0
