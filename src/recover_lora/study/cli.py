"""``recover-lora study``: the command, and :func:`run_study`."""

from __future__ import annotations

import shlex
import time
from dataclasses import asdict
from pathlib import Path

import torch

from ..utils import RecoverLoraError, atomic_write_json, sigterm_as_interrupt
from .config import FAILED, Run, StudyConfig, describe_plan, plan
from .files import mirror_results, pack_results, seed_from_mirror, set_aside, unpack_results
from .results import write_results
from .workers import execute, run_workers, worker_main


def run_study(cfg: StudyConfig, only: list[str] | None = None, dry_run: bool = False, progress: bool = True,
              command: str | None = None, jobs: int = 1, stop_after: float | None = None,
              skip: list[str] | None = None, again: list[str] | None = None) -> list[Run]:
    """Run every selected, unfinished run (see the package's docstring), ``jobs`` at a time, starting
    none after ``stop_after`` seconds (a device lease: what is started should finish); then write
    RESULTS.md. ``again``: globs of runs to run again from their start (:func:`set_aside`)."""
    deadline = time.time() + stop_after if stop_after is not None else None
    runs = plan(cfg, only, skip)
    if not runs:
        raise RecoverLoraError(f"--only {only} (--skip {skip}) selects no run; models {list(cfg.models)}, damages "
                               f"{list(cfg.damages)}, methods {list(cfg.all_methods())}")
    if jobs < 1:
        raise RecoverLoraError(f"--jobs must be at least 1, not {jobs}")
    if seed_from_mirror(cfg):  # a fresh checkout: the committed results first (a dry run too: they are done)
        runs = plan(cfg, only, skip)
    if again:
        named = plan(cfg, again)
        if not named:
            raise RecoverLoraError(f"--again {again} selects no run")
        # a finished run only: one that is under way (an interrupted --again) resumes instead of starting over
        redo = [r for r in named if (r.dir / "done.json").exists()]
        if dry_run and redo:
            print(f"would run again from their start: {', '.join(r.name for r in redo)}")
        elif redo:
            for r in redo:
                set_aside(cfg, r)
        runs = list({r.name: r for r in runs + named}.values())  # a run named again is selected too
    print(describe_plan(cfg, runs), flush=True)
    if dry_run:
        return runs
    study = Path(cfg.study_dir)
    study.mkdir(parents=True, exist_ok=True)
    atomic_write_json(study / "study.json", asdict(cfg))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    with open(study / "commands.log", "a") as f:
        f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')}\t{device}\t{command or 'run_study()'}\n")
    todo = [r for r in runs if r.status() != "done"]
    if jobs > 1 and len(todo) > 1:
        run_workers(cfg, todo, min(jobs, len(todo)), progress, deadline)
    else:
        execute(cfg, todo, progress, deadline=deadline)
    write_results(cfg.study_dir, cfg.results, cfg)
    mirror_results(cfg)
    failed = [r.name for r in runs if r.status().startswith("failed")]  # (a stale failed.json beside a done.json: done)
    if failed:
        raise RecoverLoraError(f"{len(failed)} run(s) failed, the others went on: {', '.join(failed)} "
                               f"(errors in each run's {FAILED}; the next call tries them again)")
    return runs


def goals_section(results: str | Path) -> str:
    """The goals as RESULTS.md states them (the study prints them when it ends)."""
    text = Path(results).read_text()
    return "## Goals" + text.split("## Goals", 1)[1].split("\n## ", 1)[0].rstrip() if "## Goals" in text else ""


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
    skip = [s for o in a.skip for s in o.split(",") if s] if getattr(a, "skip", None) else None
    again = [s for o in a.again for s in o.split(",") if s] if getattr(a, "again", None) else None
    if a.results_only or getattr(a, "unpack", None):
        seed_from_mirror(cfg)  # a study made elsewhere (a GPU machine) lives here in its mirror alone
    if getattr(a, "unpack", None):
        print(f"unpacked {unpack_results(a.unpack, cfg.study_dir, cfg.mirror)} files into {cfg.study_dir}")
        mirror_results(cfg)  # and into the repository's copy, to be committed
        a.results_only = True
    try:
        with sigterm_as_interrupt():  # SIGTERM (a `timeout` around the command) ends the runs as Ctrl-C does
            if a.results_only:
                print(f"wrote {write_results(cfg.study_dir, cfg.results, cfg)}")
                print(goals_section(cfg.results))
            else:
                argv = ["recover-lora", "study", "--config", a.config] + (["--only", *a.only] if a.only else [])
                argv += ["--skip", *a.skip] if skip else []
                argv += ["--again", *a.again] if again else []
                argv += ["--jobs", str(a.jobs)] if a.jobs != 1 else []
                argv += ["--stop-after", str(a.stop_after)] if a.stop_after is not None else []
                run_study(cfg, only, dry_run=a.dry_run, command=" ".join(shlex.quote(x) for x in argv), jobs=a.jobs,
                          stop_after=a.stop_after, skip=skip, again=again)
                if not a.dry_run:
                    print(f"wrote {cfg.results}")
                    print(goals_section(cfg.results))
    finally:  # whatever finished comes back, also from an interrupted or failed call
        if getattr(a, "pack", None) and not a.dry_run and Path(cfg.study_dir).is_dir():
            print(f"packed {pack_results(cfg.study_dir, a.pack)} files into {a.pack}")
    return 0
