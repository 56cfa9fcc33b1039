"""Where a run stands, and what a step reads from that: its learning rate and its batch."""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..utils import RecoverLoraError


@dataclass
class TrainState:
    step: int = 0
    history: list[dict] = field(default_factory=list)  # {"step", "loss", ..., "lr", "tokens", "time"}
    evals: list[dict] = field(default_factory=list)  # {"step", "kl", "top1"}
    elapsed: float = 0.0
    step_mode: str = ""  # "cuda_graph" or "eager" (with the reason the graph was not used)
    rewound_at: int = 0  # the step after which the weights went back to their start (rewind_rise); 0 = never


def lr_lambda(cfg, rewound_at: int = 0) -> Callable[[int], float]:
    """Linear warmup over ``cfg.warmup_steps``, then cosine decay to ``cfg.min_lr_ratio`` at ``cfg.steps``.
    After a rewind at step ``rewound_at``: the same shape over the remaining steps, scaled by
    ``cfg.rewind_lr_scale``."""
    scale = cfg.rewind_lr_scale if rewound_at else 1.0
    steps = cfg.steps - rewound_at

    def f(step: int) -> float:
        step -= rewound_at
        if step < cfg.warmup_steps:
            return scale * (step + 1) / max(1, cfg.warmup_steps)
        span = max(1, steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return scale * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
    return f


RISE_WINDOW = 10  # steps per mean: one batch's loss is noisy


def loss_rise(history: list[dict], k: int = RISE_WINDOW) -> float | None:
    """The last ``k`` steps' mean training loss over the first ``k`` steps' (None before ``2k`` steps)."""
    if len(history) < 2 * k:
        return None
    first = sum(h["loss"] for h in history[:k]) / k
    last = sum(h["loss"] for h in history[-k:]) / k
    return last / first if first > 0 else None


def batch_indices(n_items: int, batch_size: int, micro_step: int, seed: int) -> torch.Tensor:
    """Indices of micro-batch ``micro_step``: epochs of seeded permutations, last partial dropped."""
    per_epoch = n_items // batch_size
    if per_epoch == 0:
        raise RecoverLoraError(f"only {n_items} training sequences for a batch of {batch_size}")
    epoch, k = divmod(micro_step, per_epoch)
    g = torch.Generator().manual_seed(zlib.crc32(f"order:{seed}:{epoch}".encode()))
    return torch.randperm(n_items, generator=g)[k * batch_size:(k + 1) * batch_size]
