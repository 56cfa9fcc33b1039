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

# the names callers use: ``from recover_lora import study; study.plan(cfg)``
from .cli import run_cli, run_study  # noqa: F401
from .config import Run, StudyConfig, degrade_config, eval_config, plan, slug  # noqa: F401
from .files import pack_results, unpack_results  # noqa: F401
from .results import check_goals, goal_methods, pool_mmlu, write_results  # noqa: F401
from .run import REF_ANSWERS, locked, slim  # noqa: F401
