"""What a repair will cost on the machine it finds, and a repair sized to a time budget.

The estimate is FLOPs at this machine's dense-matmul rate (measured in a fraction of a second at
start), scaled by the share of that rate each stage reaches, as measured on the 2-core development
CPU (BENCHMARKS.md, "CPU" sections; SmolLM2-135M, fp32 gemm 146 GFLOP/s):

- synthesis decodes at ``DECODE_EFFICIENCY`` x the fp32 decode limit (2N FLOP a token), setup
  included (the CPU default decodes with a bf16 copy where the CPU multiplies bf16): 615 tokens/s
  for 32,768 tokens against a limit of 672 at the start-up probe's 181 GFLOP/s;
- distillation costs ``TRAIN_FLOPS_PER_TOKEN`` x N FLOP a training token at the fp32 rate (teacher
  and student forwards, the student's backward through frozen weights): 4.1 s a step of 8 x 64;
- the auto placement's diagnosis runs each layer's damage alone: ``DIAGNOSE_PASSES`` x layers
  forwards of the held-out sequences.

N = non-embedding parameters + the LM head. The estimate is printed before any work on a CPU, and
``recover --time-budget 15m`` sizes the steps (and, on a CPU, the batch and sequence length unless
given) so that synthesis, training and the measurements fit the budget. A GPU keeps the paper-sized
defaults: its estimate is not printed, and ``--time-budget`` is refused there (the rates above are
a CPU's).
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from typing import Any

import torch

from .utils import RecoverLoraError

# calibrated on SmolLM2, 2 threads, alone (BENCHMARKS.md, "a repair sized to a time budget")
DECODE_EFFICIENCY = 0.9  # tokens/s x 2N / probed fp32 gemm rate, CPU default decode with its setup
TRAIN_FLOPS_PER_TOKEN = 11.0  # x N, at the probed fp32 gemm rate
DIAGNOSE_PASSES = 2.0  # forwards of the held-out data per layer (diagnose.py: damage one layer, measure)
FIXED_SECONDS = 25.0  # loading, saving, plots
CPU_BATCH, CPU_SEQ_LEN = 8, 64  # a budgeted CPU run's shape unless --distill.batch-size / --synth.seq-len are given
MIN_STEPS = 10


def parse_duration(text: str | float | int) -> float:
    """Seconds from "900", "15m", "1.5h", "90s" or "1h30m"."""
    if isinstance(text, (int, float)):
        secs = float(text)
    else:
        t = str(text).strip().lower()
        parts = re.findall(r"(\d+(?:\.\d+)?)\s*([hms]?)", t)
        if not parts or re.sub(r"[\d.\shms]", "", t) or "".join(n + u for n, u in parts) != t.replace(" ", ""):
            raise RecoverLoraError(f"cannot read the duration {text!r}: use e.g. 900, 90s, 15m, 1.5h, 1h30m")
        secs = sum(float(n) * {"h": 3600, "m": 60, "s": 1, "": 1}[u] for n, u in parts)
    if not math.isfinite(secs) or secs <= 0:
        raise RecoverLoraError(f"the time budget must be positive, not {text!r}")
    return secs


def flop_params(model) -> int:
    """N: parameters that cost FLOPs per token (non-embedding + the LM head)."""
    total = sum(p.numel() for p in model.parameters())
    emb = model.get_input_embeddings().weight.numel()
    head = model.get_output_embeddings().weight.numel()
    return total - emb + head


def gemm_rate(n: int = 1536, reps: int = 3, trials: int = 3, dtype: torch.dtype = torch.float32) -> float:
    """Dense matmul FLOP/s on this CPU at ``dtype`` (fp32: the decode limit's yardstick), the best of a
    few short trials (about half a second: on a shared or virtual machine single trials vary by 20%)."""

    def trial() -> float:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        for _ in range(2):
            a @ b
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        return reps * 2 * n ** 3 / (time.perf_counter() - t0)

    return max(trial() for _ in range(trials))


@dataclass
class Estimate:
    synth_s: float
    train_s: float
    heldout_s: float
    diagnose_s: float
    fixed_s: float
    gemm_gflops: float
    decode_tokens_s: float
    train_tokens_s: float

    @property
    def total_s(self) -> float:
        return self.synth_s + self.train_s + self.heldout_s + self.diagnose_s + self.fixed_s

    def to_dict(self) -> dict[str, Any]:
        return {k: round(v, 1) for k, v in {**self.__dict__, "total_s": self.total_s}.items()}


def _layers(model) -> int:
    c = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    return int(c.num_hidden_layers)


def estimate(cfg, model, rate: float | None = None) -> Estimate:
    """The run's cost in seconds on this CPU (``cfg``: a RecoverConfig)."""
    from .config import train_synth_config

    rate = rate or gemm_rate()
    n = flop_params(model)
    dec = DECODE_EFFICIENCY * rate / (2 * n)
    trn = rate / (TRAIN_FLOPS_PER_TOKEN * n)
    d = cfg.distill
    seq = cfg.synth.seq_len
    synth_tokens = 0 if cfg.data or cfg.method == "sft-lora" else train_synth_config(cfg).num_sequences * seq
    train_tokens = d.steps * d.batch_size * d.grad_accum * seq
    held = cfg.heldout_sequences * seq
    # held-out data is decoded, then measured on before and after (two forwards, ~2N each)
    heldout_s = held / dec + 2 * held * 2 * n * 2 / rate
    diag = DIAGNOSE_PASSES * _layers(model) * held * 2 * n / rate if cfg.placement == "auto" else 0.0
    return Estimate(synth_tokens / dec, train_tokens / trn, heldout_s, diag, FIXED_SECONDS, rate / 1e9, dec, trn)


def _hms(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def describe(cfg, est: Estimate) -> str:
    """The cost line printed before a CPU run starts."""
    from .config import train_synth_config

    d = cfg.distill
    parts = []
    if est.synth_s:
        parts.append(f"synthesize {train_synth_config(cfg).num_sequences:,} x {cfg.synth.seq_len} tokens "
                     f"(~{_hms(est.synth_s)} at ~{est.decode_tokens_s:.0f} tokens/s)")
    parts.append(f"train {d.steps} steps of {d.batch_size * d.grad_accum} x {cfg.synth.seq_len} "
                 f"(~{_hms(est.train_s)} at ~{est.train_tokens_s:.0f} tokens/s)")
    if est.diagnose_s:
        parts.append(f"diagnose for the auto placement (~{_hms(est.diagnose_s)})")
    return (f"this run will {', '.join(parts)}: about {_hms(est.total_s)} on this CPU (dense matmul "
            f"{est.gemm_gflops:.0f} GFLOP/s){' plus the benchmark evaluation' if cfg.eval.tasks else ''}. "
            "To make it smaller: --time-budget 15m (sizes steps, batch and length to fit), or --distill.steps, "
            "--distill.batch-size, --synth.seq-len.")


def size_to_budget(cfg, model, budget_s: float, explicit: set[str] = frozenset(), rate: float | None = None) -> dict:
    """Set ``cfg``'s steps (and, unless in ``explicit``, batch size and sequence length to the CPU
    shape) so that the estimate fits ``budget_s``; synthesis is one pass over fresh data. Returns
    what was chosen, with the estimate. Refuses a budget that cannot hold ``MIN_STEPS`` steps."""
    rate = rate or gemm_rate()
    if "batch_size" not in explicit:
        cfg.distill.batch_size = min(cfg.distill.batch_size, CPU_BATCH)
    if "seq_len" not in explicit:
        cfg.synth.seq_len = min(cfg.synth.seq_len, CPU_SEQ_LEN)
    cfg.synth.num_sequences = 0  # one pass: as many sequences as the steps consume
    cfg.distill.steps = 1
    one = estimate(cfg, model, rate)
    cfg.distill.steps = 2
    per_step = estimate(cfg, model, rate).total_s - one.total_s
    fixed = one.total_s - per_step
    steps = int((budget_s - fixed) // per_step) if per_step > 0 else MIN_STEPS
    if steps < MIN_STEPS:
        raise RecoverLoraError(f"a {_hms(budget_s)} budget does not fit {MIN_STEPS} steps here (fixed costs "
                               f"~{_hms(fixed)}, ~{per_step:.1f} s a step): give at least "
                               f"{_hms(fixed + MIN_STEPS * per_step)}")
    cfg.distill.steps = steps
    cfg.distill.warmup_steps = min(cfg.distill.warmup_steps, max(1, steps // 10))
    est = estimate(cfg, model, rate)
    return {"budget_s": budget_s, "steps": steps, "batch_size": cfg.distill.batch_size,
            "seq_len": cfg.synth.seq_len, "warmup_steps": cfg.distill.warmup_steps, "estimate": est.to_dict()}
