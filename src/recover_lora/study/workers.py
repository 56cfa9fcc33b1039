"""Going through the runs: in this process, or claimed one at a time by ``--jobs`` worker processes."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

from ..config import RecoverConfig, train_synth_config
from ..errors import Interrupted
from ..utils import RecoverLoraError, atomic_write_json, log, read_json
from .config import FAILED, Run, StudyConfig, accuracy_config, degrade_config, eval_config, plan, slug
from .files import mirror_results
from .run import (MEMORY_LOCK, answers_file, evaluate_tiers, heavy, locked, machine_threads, prepare_plan,
                  reference_answers, run_one, synth_ready, timed, write_off_lost)

CLAIM = ".claim"  # in a run folder while a parallel worker has it


def execute(cfg: StudyConfig, todo: list[Run], progress: bool = True, mode: str = "run", jobs: int = 1,
            deadline: float | None = None) -> None:
    """Go through ``todo`` (grouped by model, then damage), loading each reference and making each
    degraded model only when a run needs it. ``mode``: ``run`` runs them all; ``prepare`` does only
    what parallel runs share (reference and degraded evaluations, the synthetic pool, the auto
    placement's diagnosis); ``claim`` (a worker) runs those it claims first (:func:`claim`). No run
    starts after ``deadline`` (``time.time()``): those left wait for the next invocation."""
    import torch

    from ..degrade import degrade
    from ..load import load_model, load_tokenizer

    study = Path(cfg.study_dir)
    common = RecoverConfig.from_dict(cfg.recover)
    model = damage = reference = degraded = None
    for run in todo:
        if deadline is not None and mode != "prepare" and time.time() > deadline:
            log.info("study: --stop-after reached; %s and the runs after it are left for the next call", run.name)
            break
        if mode == "claim" and not claim(run):
            continue
        if run.model != model:
            model, damage, reference, degraded = run.model, None, None, None
            ecfg, acfg = eval_config(cfg, model), accuracy_config(cfg, model)  # its precision
            log.info("study: loading %s (%s)", model, cfg.models[model])
            reference = load_model(cfg.models[model], common.load)
            tokenizer = load_tokenizer(cfg.models[model], common.load)
            ev = study / slug(model) / "eval"
            # (what runs share is made under the memory lock too, shared: a heavy run has the machine alone)
            with locked(study / MEMORY_LOCK, shared=True), locked(ev / ".lock"):
                # the reference's answers are kept on the largest item set; every evaluation after
                # it takes the answer-token KL from them (the measures' items are the first of those)
                answers = reference_answers(ev / answers_file(ecfg), reference, tokenizer, acfg or ecfg,
                                            ev / ("reference-accuracy.json" if acfg else "reference.json"),
                                            progress) if cfg.eval.get("answer_kl") else None
                ref_acc, ref_res = evaluate_tiers(ev, "reference", lambda m=reference: m, tokenizer, ecfg, acfg,
                                                  progress)
            mirror_results(cfg)
        if run.damage != damage:
            damage, degraded = run.damage, None
            degraded = copy.deepcopy(reference)
            degrade(degraded, degrade_config(cfg, damage, model))
            dv = study / slug(model) / slug(damage) / "eval"
            with locked(study / MEMORY_LOCK, shared=True), locked(dv / ".lock"):
                deg_acc, deg_res = evaluate_tiers(dv, "degraded", lambda m=degraded: m, tokenizer, ecfg, acfg,
                                                  progress, answers)
            mirror_results(cfg)
        pool = _synth_pool(cfg, model, run.method, reference, tokenizer, cfg.common_config(model), progress)
        if mode == "prepare":
            prepare_plan(run, cfg.recover_config(model, damage, run.method, pool), reference, degraded, tokenizer,
                         progress)
        else:
            rcfg = cfg.recover_config(model, damage, run.method, pool)
            # runs side by side (two study processes) share the memory; a heavy one (full-KD of a 0.5B
            # model) waits until no other run is going, holds the others off until it is done, and
            # meanwhile uses every core
            alone = heavy(rcfg, reference)
            with locked(study / MEMORY_LOCK, shared=not alone), machine_threads(alone):
                _run_recorded(cfg, run, reference, degraded, tokenizer, ecfg, ref_res, deg_res, pool, progress,
                              jobs, acfg, ref_acc, deg_acc, answers)
            if rcfg.method == "full-kd":  # it trained the degraded model in place: make it anew for the next run
                damage = degraded = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _synth_pool(cfg: StudyConfig, model: str, method: str, reference, tokenizer, common: RecoverConfig,
                progress: bool) -> Path | None:
    """The model's shared synthetic pool (made under a lock, once) if ``method`` uses it, else None."""
    from ..synth import synthesize

    if not cfg.uses_pool(method):
        return None
    mdir = Path(cfg.study_dir) / slug(model)
    with locked(Path(cfg.study_dir) / MEMORY_LOCK, shared=True), locked(mdir / ".synth.lock"):
        if not synth_ready(mdir / "synth"):
            # a pool made before on a machine that is gone (no shard here) is not this one's cost
            write_off_lost(mdir / "timing.json", "synth_pool", kept=any((mdir / "synth").glob("shard-*")))
            with timed(mdir / "timing.json", "synth_pool"):
                synthesize(reference, tokenizer, train_synth_config(common), mdir / "synth", progress=progress)
    return mdir / "synth"


def _run_recorded(cfg: StudyConfig, run: Run, *args) -> None:
    """:func:`run_one`; an error is recorded in the run's failed.json and the next run goes on: one
    bad run must not stop days of unattended runs. A failed run is tried again at each invocation."""
    (run.dir / FAILED).unlink(missing_ok=True)
    try:
        run_one(cfg, run, *args)
        if cfg.mirror:  # the mirror only gains files: its copy of an earlier failure goes by hand
            (Path(cfg.mirror) / run.dir.relative_to(cfg.study_dir) / FAILED).unlink(missing_ok=True)
    except Interrupted:  # Ctrl-C / SIGTERM inside training or synthesis: stop the study, not just this run
        raise
    except Exception as e:  # noqa: BLE001 - any error of one run (a bug in one method too)
        log.error("study: %s failed (%s: %s); going on with the next run", run.name, type(e).__name__, e)
        run.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run.dir / FAILED, {"error": f"{type(e).__name__}: {e}",
                                             "traceback": traceback.format_exc()[-4000:]})


def claim(run: Run) -> bool:
    """Atomically take ``run`` for this worker process; False if another worker has it or it is done."""
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
    from tqdm.auto import tqdm

    execute(cfg, todo, progress, mode="prepare")
    study = Path(cfg.study_dir)
    for run in todo:  # claims left by an earlier, interrupted invocation
        (run.dir / CLAIM).unlink(missing_ok=True)
    atomic_write_json(study / "queue.json", {"jobs": jobs, "deadline": deadline, "runs": [r.name for r in todo]})
    (study / "logs").mkdir(exist_ok=True)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))  # no CPU oversubscription
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2]) + os.pathsep + env.get("PYTHONPATH", "")  # src/
    # N processes on one GPU: each keeps to its share (nine at full batch ran out of an H200's memory),
    # and expandable segments keep the varying evaluation batches from fragmenting it
    env["RECOVER_LORA_GPU_SHARE"] = repr(1.0 / jobs)
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
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
    import torch

    share = float(os.environ.get("RECOVER_LORA_GPU_SHARE") or 1.0)
    if torch.cuda.is_available() and share < 1.0:  # an error in this process, not in a neighbour's
        torch.cuda.set_per_process_memory_fraction(0.95 * share)
    execute(cfg, [runs[n] for n in queue["runs"]], progress=False, mode="claim", jobs=queue["jobs"],
             deadline=queue.get("deadline"))
    return 0

