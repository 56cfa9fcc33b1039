"""One run: recover (or resume), evaluate the repaired model, write ``done.json``; and what runs share,
made once: evaluations cached by their settings, the reference's kept answers, file locks, timings."""

from __future__ import annotations

import contextlib
import copy
import functools
import time
from pathlib import Path

import numpy as np

from ..config import RecoverConfig
from ..recover import recover as run_recover  # module-level name: tests count calls by patching it
from ..report import build_report, compute_measures, item_array
from ..utils import RecoverLoraError, atomic_write_json, log, read_json
from .config import Run, StudyConfig, done_summary
from .files import mirror_results
from .results import pool_mmlu, write_results

REF_ANSWERS = "reference-answers.pt"  # the reference's kept answers (not mirrored: ~0.3-0.6 GB)


def answers_file(ecfg) -> str:
    """Where a model's reference answers are kept: one file a scoring precision (bf16 autocast's
    hidden states are not fp32's)."""
    return REF_ANSWERS if ecfg.autocast == "off" else REF_ANSWERS.replace(".pt", f"-{ecfg.autocast}.pt")


@contextlib.contextmanager
def timed(path: Path, key: str, beat: float = 30.0):
    """Add the wall seconds of the block to ``path[key]``, and this process's CPU seconds (all its
    threads) to ``path[key + "_cpu"]``, also when it is interrupted, and every ``beat`` seconds on the
    way: a process killed outright (a session's end) loses at most one beat of its run's cost. On a
    CPU the CPU seconds are the cost: they do not count time the process waited (paused, or sharing)."""
    import threading

    have = read_json(path) if path.exists() else {}
    w0, c0 = have.get(key, 0.0), have.get(f"{key}_cpu", 0.0)
    t0, p0 = time.perf_counter(), time.process_time()
    stop = threading.Event()

    def write():
        d = read_json(path) if path.exists() else {}
        d[key] = round(w0 + time.perf_counter() - t0, 3)
        d[f"{key}_cpu"] = round(c0 + time.process_time() - p0, 3)
        atomic_write_json(path, d)

    def heartbeat():
        while not stop.wait(beat):
            write()

    path.parent.mkdir(parents=True, exist_ok=True)
    th = threading.Thread(target=heartbeat, daemon=True, name="study-timing")
    th.start()
    try:
        yield
    finally:
        stop.set()
        th.join()
        write()


@contextlib.contextmanager
def locked(path: Path, shared: bool = False):
    """Hold an exclusive lock on ``path`` (waiting for it): two study processes run side by side
    (``--only`` on disjoint runs, a core each) make what they share (the reference's answers, a
    degraded model's evaluation, the synthetic pool) once, the second waiting and then reusing it.
    ``shared``: a shared lock, which any number hold at once while nobody holds it exclusively."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


MEMORY_LOCK = ".memory.lock"  # in the study folder: a run that needs most of the machine's memory holds it alone


@contextlib.contextmanager
def machine_threads(alone: bool):
    """A run that holds the machine alone (a heavy one, under the exclusive memory lock) computes on
    all of its cores for the block: study processes run one thread each so that two share a 2-core
    machine, and while a heavy run goes the other one waits. torch's thread count is restored after."""
    import os

    import torch

    before = torch.get_num_threads()
    if alone:  # the cores this process may use (affinity where the OS has it, e.g. not macOS)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        torch.set_num_threads(cores or before)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def heavy(rcfg: RecoverConfig, reference, ram_bytes: int | None = None) -> bool:
    """Whether a run needs the machine's memory to itself: full-KD trains every weight (AdamW: weights,
    gradients and two moments) beside the reference, ~5 copies of the model in fp32 (Qwen2.5-0.5B
    ~15 GB); a second study process beside it (its models and a run of its own) would not fit in 24 GB.
    Heavy: that estimate over 40% of the machine's RAM."""
    if rcfg.method != "full-kd" or next(reference.parameters()).device.type != "cpu":  # (GPU runs: --jobs)
        return False
    if ram_bytes is None:
        import os
        ram_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return 5 * 4 * sum(p.numel() for p in reference.parameters()) > 0.4 * ram_bytes


def write_off_lost(path: Path, key: str, kept: bool) -> None:
    """Time spent on work that is gone is not a run's cost: when nothing of an earlier attempt at
    ``key`` is kept (no checkpoint, no evaluation part; a session's machine lost with them, or a kill
    before the first checkpoint), its seconds move to ``<key>_lost`` (and ``<key>_cpu_lost``)."""
    have = read_json(path) if path.exists() else {}
    if kept or not (have.get(key) or have.get(f"{key}_cpu")):
        return
    for k in (key, f"{key}_cpu"):
        have[f"{k}_lost"] = round(have.get(f"{k}_lost", 0.0) + have.pop(k, 0.0), 3)
    atomic_write_json(path, have)
    log.info("study: %s: %.1f min of an earlier attempt at %s left nothing here: not counted as its cost",
             path.parent.name, have[f"{key}_lost"] / 60, key)


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
    from ..evaluate.runner import config_dict

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
    from ..evaluate import evaluate
    from ..evaluate.partial import earlier_seconds, partial_path, remove_partial

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
    part = partial_path(path)  # an interrupted evaluation resumes from its finished batches
    res = slim(evaluate(get_model(), tokenizer, ecfg, progress=progress, reference=reference,
                        name=f"{path.parent.parent.name}/{path.stem}", resume=part))
    seconds = time.perf_counter() - t0 + earlier_seconds(part)  # with the passes an interruption cut short
    atomic_write_json(path, {"config": key, "seconds": round(seconds, 2), "results": res})
    remove_partial(part)
    return res


def reference_answers(path: Path, reference, tokenizer, ecfg, results_path: Path, progress: bool = True):
    """The reference's answers kept on ``ecfg``'s items (loaded, or made by one evaluation of the
    reference, which also writes ``results_path`` where missing): every later model's answer-token
    KL then costs an LM-head product instead of a second forward pass."""
    from ..evaluate import ReferenceAnswers, evaluate_reference
    from ..evaluate.partial import earlier_seconds, partial_path, remove_partial

    if path.exists():
        try:
            return ReferenceAnswers.load(path, reference)
        except (RecoverLoraError, OSError, RuntimeError, KeyError) as e:
            log.warning("%s: %s; keeping the reference's answers again", path, e)
    log.info("study: keeping the reference's answers on %s items a task (%s)", ecfg.limit, path)
    t0 = time.perf_counter()
    part = partial_path(path)
    res, answers = evaluate_reference(reference, tokenizer, ecfg, progress, resume=part)
    answers.save(path)
    seconds = round(time.perf_counter() - t0 + earlier_seconds(part), 2)
    if not _have(results_path, _eval_key(ecfg, False)):
        atomic_write_json(results_path, {"config": _eval_key(ecfg, False), "seconds": seconds, "results": slim(res)})
    else:  # made again (a fresh machine): how far this one's evaluation is from the kept one
        recheck_reference(results_path, slim(res), seconds)
    remove_partial(part)
    return answers


def cpu_name() -> str:
    """This machine's processor, as /proc/cpuinfo names it (or platform's guess)."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def recheck_reference(results_path: Path, new: dict, seconds: float) -> dict:
    """Compare a reference evaluation made again (another machine, same settings) with the kept one,
    choice by choice, and append the comparison to ``<results>-recheck.json``: the study's rows made on
    different CPUs are comparable only if the reference chooses the same answers on both."""
    old = read_json(results_path)["results"]
    tasks = {}
    for t, r in new.items():
        if t not in old or "items" not in r:
            continue
        row = {"n": r.get("n"), "acc_kept": old[t].get("acc"), "acc_now": r.get("acc"),
               # this machine's choices: its rows' agreement can be measured against them too (tools/cross_machine.py)
               "items_now": {k: v for k, v in r["items"].items() if k in ("pred", "pred_norm")}}
        for k in ("pred", "pred_norm"):
            a, b = old[t]["items"].get(k), r["items"].get(k)
            if a is not None and b is not None and len(a) == len(b):
                row[f"same_{k}"] = round(float(np.mean(np.asarray(list(a)) == np.asarray(list(b)))), 5)
        tasks[t] = row
    entry = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": cpu_name(), "seconds": seconds,
             "seconds_kept": read_json(results_path).get("seconds"), "tasks": tasks}
    out = results_path.with_name(results_path.stem + "-recheck.json")
    atomic_write_json(out, (read_json(out) if out.exists() else []) + [entry])
    same = [v["same_pred"] for v in tasks.values() if "same_pred" in v]
    log.info("study: the reference evaluated again on %s: the same choice on %.2f%% of items (min over tasks %.2f%%)",
             entry["cpu"], 100 * float(np.mean(same)) if same else float("nan"), 100 * min(same) if same else float("nan"))
    return entry


def evaluate_tiers(folder: Path, name: str, get_model, tokenizer, ecfg, acfg, progress: bool = True,
                   answers=None) -> tuple[dict | None, dict]:
    """(accuracy results or None, measures' results) of one model, cached in ``folder/<name>[-accuracy].json``:
    with ``acfg`` (a headline row) one evaluation on the accuracy items, the measures being their first
    items. ``answers``: the reference's kept answers, for the answer-token KL (on both where needed)."""
    acc, meas = folder / f"{name}-accuracy.json", folder / f"{name}.json"
    acc_res = None
    if acfg is not None:
        need_kl = answers is not None and not _have(meas, _eval_key(ecfg, True))
        acc_res = cached_eval(acc, get_model, tokenizer, acfg, progress, reference=answers if need_kl else None)
    return acc_res, cached_eval(meas, get_model, tokenizer, ecfg, progress, reference=answers,
                                source=acc if acfg is not None else None)


def load_repaired(run: Run, rcfg: RecoverConfig, degraded):
    """The repaired model from what recover() saved: full-kd's model/, or degraded + adapter/."""
    from ..load import load_model
    from ..provenance import apply_adapter

    if rcfg.method == "full-kd":
        return load_model(str(run.dir / "model"), rcfg.load)
    return apply_adapter(copy.deepcopy(degraded), run.dir / "adapter")  # NaN/Inf zeroed as recover() did


def _plan_key(rc: dict) -> list:
    """What an auto placement depends on: rank, alpha, budget and the held-out sequences."""
    return [rc["adapter"]["rank"], rc["adapter"]["alpha"], rc.get("placement_budget"), rc.get("heldout_sequences"),
            rc["synth"]["seq_len"], rc["synth"]["seed"], rc.get("reference"), rc.get("degraded")]


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


def synth_ready(folder: Path) -> bool:
    """A complete synthetic set (the pool, a held-out set) whose shards are on this machine: what
    comes back from another machine, or from the mirror, is its manifest alone."""
    man = read_json(folder / "manifest.json") if (folder / "manifest.json").exists() else {}
    return bool(man.get("complete")) and all((folder / s["file"]).exists() for s in man.get("shards", []))


def heldout_digest(folder: Path) -> str | None:
    """A short digest of a held-out set's token ids: runs measured on the same sequences share it."""
    import hashlib

    from ..synth import MANIFEST, load_synthetic

    if not (folder / MANIFEST).exists():
        return None
    ids = load_synthetic(folder).long().contiguous()
    return hashlib.sha256(ids.numpy().tobytes()).hexdigest()[:16]


def share_heldout(run: Run, rcfg: RecoverConfig, reference, tokenizer, progress: bool = True) -> None:
    """One held-out set per model and settings: every run of a model measures on the same sequences.
    Made once, under a lock, in ``<model>/heldout-<key>`` and copied into the run's folder before the
    run would make its own. On a CPU that is what each run makes anyway; on a GPU, bf16 decoding in
    different processes need not be bit-reproducible (H200, 2026-12-04: the degraded model's held-out
    KL was 0.546 on most runs, 0.559 on the run whose set another process made)."""
    import hashlib
    import shutil

    from ..config import train_synth_config
    from ..synth import heldout, heldout_config, settings_key

    mine = run.dir / "heldout"
    if synth_ready(mine):
        return  # its own, whole: a run resumed on the machine that began it keeps its set
    shutil.rmtree(mine, ignore_errors=True)  # a manifest from another machine without its shards, or a part
    hcfg = heldout_config(train_synth_config(rcfg), rcfg.heldout_sequences)
    key = settings_key(reference, tokenizer, hcfg)
    tag = hashlib.sha256(repr((sorted(key.items()), rcfg.heldout_sequences)).encode()).hexdigest()[:8]
    shared = run.dir.parents[1] / f"heldout-{tag}"  # run.dir: <study>/<model>/<damage>/<method>
    with locked(run.dir.parents[1] / f".heldout-{tag}.lock"):
        heldout(reference, tokenizer, train_synth_config(rcfg), rcfg.heldout_sequences, shared, progress)
        run.dir.mkdir(parents=True, exist_ok=True)
        tmp = run.dir / ".heldout.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(shared, tmp)
        tmp.rename(mine)


def prepare_plan(run: Run, rcfg: RecoverConfig, reference, degraded, tokenizer, progress: bool = True) -> None:
    """Before runs go out to parallel workers: give an auto-placement run its plan now (a
    sibling's, else diagnose it here, as recover() would), so siblings running side by side share
    one diagnosis instead of each making its own."""
    from ..methods.recover_lora import placement_plan
    from ..recover import make_heldout

    if rcfg.placement != "auto" or (run.dir / "diagnosis" / "plan.json").exists() or share_plan(run, rcfg):
        return
    log.info("study: %s: diagnosing for the auto placement of its siblings", run.name)
    run.dir.mkdir(parents=True, exist_ok=True)
    share_heldout(run, rcfg, reference, tokenizer, progress)
    atomic_write_json(run.dir / "config.json", rcfg.to_dict())  # what share_plan matches siblings on
    # timed apart: run_one writes an earlier "recover" off when no checkpoint is kept, but the plan is kept
    with timed(run.dir / "timing.json", "diagnose"):
        placement_plan(rcfg, reference, degraded, tokenizer, make_heldout(rcfg, reference, tokenizer, progress))


def run_one(cfg: StudyConfig, run: Run, reference, degraded, tokenizer, ecfg, ref_res: dict, deg_res: dict,
            pool: Path | None, progress: bool = True, jobs: int = 1, acfg=None, ref_acc: dict | None = None,
            deg_acc: dict | None = None, answers=None) -> dict:
    """Recover (or resume), evaluate the repaired model (the measures of ``ecfg``, and accuracy on
    ``acfg``'s items for a headline method), and write ``done.json``. ``jobs``: how many runs shared
    the device meanwhile (recorded: their minutes are wall time while sharing). ``answers``: the
    reference's kept answers, for the answer-token KL."""
    import torch

    rcfg = cfg.recover_config(run.model, run.damage, run.method, pool)
    timing = run.dir / "timing.json"
    # a finished run evaluated again (its accuracy run, added later): how it was trained stays as recorded
    trained_as = read_json(run.dir / "done.json") if (run.dir / "done.json").exists() and run.trained() else {}
    if not run.trained():  # (a report.json that came back without its adapter, from another machine: again)
        log.info("study: %s: recover (%s)", run.name, rcfg.method)
        share_plan(run, rcfg)
        share_heldout(run, rcfg, reference, tokenizer, progress)
        write_off_lost(timing, "recover", kept=(run.dir / "checkpoint.pt").exists())
        with timed(timing, "recover"):
            # full-KD trains the degraded model itself: no copy (the caller makes it anew for the next run)
            run_recover(rcfg, reference, degraded if rcfg.method == "full-kd" else copy.deepcopy(degraded), tokenizer,
                        progress=progress)
    rep = read_json(run.dir / "report.json")
    get_repaired = functools.cache(lambda: load_repaired(run, rcfg, degraded))  # only if an evaluation is not cached
    # a headline method's row: accuracy on more items too, the measures being its first items
    headline = acfg is not None and run.method in (cfg.accuracy or {}).get("methods", [])
    write_off_lost(timing, "eval", kept=any((run.dir / "eval").glob("*recovered*")))
    with timed(timing, "eval"):
        rec_acc, rec_res = evaluate_tiers(run.dir / "eval", "recovered", get_repaired, tokenizer, ecfg,
                                          acfg if headline else None, progress,
                                          answers if cfg.eval.get("answer_kl") else None)
    ref, deg, rec = (ref_acc, deg_acc, rec_acc) if rec_acc is not None else (ref_res, deg_res, rec_res)
    summary = build_report(pool_mmlu(ref), pool_mmlu(deg), pool_mmlu(rec), run.dir / "eval")
    measures = compute_measures(pool_mmlu(ref_res), pool_mmlu(rec_res))
    secs = read_json(timing)
    done = {"model": run.model, "damage": run.damage, "method": run.method, "spec": rcfg.reference,
            "recover_method": rcfg.method, "placement": rcfg.placement,
            "init": rep.get("init"), "trainable_parameters": rep["trainable_parameters"],
            "train_tokens": rep["train_tokens"], "steps": rep["steps"],
            "synthetic_sequences": rep["synthetic_sequences"], "shared_pool": pool is not None,
            # recover's minutes: with the diagnosis made for it before the workers started (prepare_plan)
            "gpu_minutes": round((secs.get("recover", 0.0) + secs.get("diagnose", 0.0)) / 60, 3),
            "eval_minutes": round(secs.get("eval", 0.0) / 60, 3),
            "cpu_minutes": {"recover": round((secs.get("recover_cpu", 0.0) + secs.get("diagnose_cpu", 0.0)) / 60, 3),
                            "eval": round(secs.get("eval_cpu", 0.0) / 60, 3)},
            "concurrent_runs": trained_as.get("concurrent_runs", 1) if trained_as else jobs,  # (older files: 1 each)
            "threads": trained_as.get("threads", 1) if trained_as else torch.get_num_threads(),  # CPU threads (a heavy run has every core: machine_threads)
            "device_name": rep.get("device_name"), "heldout": rep["heldout"],
            # which CPU: its bf16 kernels choose differently from another's on ~1.5% of items (*-recheck.json)
            "cpu": cpu_name() if rep.get("device_name") == "cpu" else None,
            "heldout_digest": heldout_digest(run.dir / "heldout"),  # which sequences (the shards do not travel)
            "warm_start_check": rep.get("warm_start_check"),
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
    log.info("study: %s done: %s", run.name, done_summary(done))
    return done


