"""The one training loop. A method says what a step trains on and what its loss is (a
:class:`Step`); :func:`fit` runs it, top to bottom: AdamW with linear warmup and cosine decay,
gradient clipping, one host sync a step, held-out measurements, metrics streamed as they come,
and atomic checkpoints from which an interrupted run resumes bit for bit (the batch order is a
pure function of seed and step). Data parallel (``parallel.py``) wraps the student before this
loop sees it; a CUDA graph (``graphs.py``) replays the step when it can.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from ..errors import Interrupted
from ..forward import autocast_on, lora_casts_off
from ..metrics import MetricsLog
from ..utils import RecoverLoraError, log, sigterm_as_interrupt
from . import graphs
from .checkpoint import load_checkpoint, save_checkpoint
from .parallel import mean_over_ranks
from .state import RISE_WINDOW, TrainState, loss_rise, lr_lambda


@dataclass
class Step:
    """What one method trains: ``batches(step)`` the micro-batches of a step (on the device);
    ``loss(batch, n, last)`` one forward and backward of one of the step's ``n`` micro-batches
    (gradients scaled by 1/n; ``last``: the step's last, where data parallel all-reduces), returning
    detached tensors named ``names`` (the loss first); ``tokens(batches)`` the tokens a step trains
    on (all ranks)."""

    batches: Callable[[int], list]
    loss: Callable[[Any, int, bool], tuple[torch.Tensor, ...]]
    names: tuple[str, ...]
    tokens: Callable[[list], int]


def _optimizer(params: list[torch.Tensor], cfg, device: torch.device, graph: bool):
    # capturable: the optimizer keeps its step count on the device and reads a tensor lr, so a
    # captured step does not freeze them.
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999),
                            fused=device.type == "cuda", capturable=graph and device.type == "cuda")
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))


def _capture(one_step, xs, params, opt, cfg, device, state: TrainState):
    """The step as a CUDA graph and the lr tensors it reads (graph None where the capture failed)."""
    for g in opt.param_groups:  # a float lr would be frozen into the graph
        g["lr"] = torch.tensor(float(g["lr"]), device=device)
    lrs = [g["lr"] for g in opt.param_groups]
    graphed, why = graphs.capture_step(one_step, xs, params, opt)
    if graphed is None and cfg.cuda_graph == "on":
        raise RecoverLoraError(f"cuda_graph='on' but the capture failed: {why}")
    state.step_mode = "cuda_graph" if graphed is not None else f"eager (graph capture failed: {why})"
    return graphed, lrs


def _rewound_schedule(sched, cfg, at: int) -> None:
    # (a scheduler's state_dict holds no function: a resumed run puts the rewound schedule back too)
    sched.lr_lambdas = [lr_lambda(cfg, at) for _ in sched.lr_lambdas]


def _rewind(params: list[torch.Tensor], start: list[torch.Tensor], opt, sched, cfg, state: TrainState) -> None:
    """Training is undoing its start: the weights back to it, the optimizer's moments and step counts
    to zero (as a fresh AdamW's; in place, so a captured CUDA graph keeps reading them) and the rest
    of the run on a smaller schedule of its own."""
    with torch.no_grad():
        for p, p0 in zip(params, start):
            p.copy_(p0)
    for st in opt.state.values():
        for v in st.values():
            if torch.is_tensor(v):
                v.zero_()
    state.rewound_at = state.step
    _rewound_schedule(sched, cfg, state.rewound_at)
    for g, base, f in zip(opt.param_groups, sched.base_lrs, sched.lr_lambdas):  # the next step's lr
        if torch.is_tensor(g["lr"]):
            g["lr"].fill_(base * f(state.step))
        else:
            g["lr"] = base * f(state.step)
    sched._last_lr = [float(g["lr"]) for g in opt.param_groups]


def _finite(loss: float, step: int) -> None:
    if not math.isfinite(loss):  # the step already spoiled the weights: keep the last checkpoint
        raise RecoverLoraError(
            f"the loss is not finite ({loss}) at step {step}; stopped without saving it (the checkpoint of an "
            "earlier step stays). Start over in a new --out-dir with a lower learning rate, or check the models")


def _record(state: TrainState, entry: dict, metrics: MetricsLog | None, bar, kind: str = "train") -> None:
    """A step's numbers (or a held-out measurement) into the state, the metrics stream and the bar."""
    (state.history if kind == "train" else state.evals).append(entry)
    if metrics is not None:
        metrics.log(kind, entry)
    if kind == "train":
        bar.update(1)
        bar.set_postfix({k: f"{v:.4f}" for k, v in list(entry.items())[1:3] if k != "lr"})
    else:
        bar.write(f"step {entry['step']}: held-out KL {entry['kl']:.4f}, top-1 {entry['top1']:.3f}")


def _interrupted(ckpt: Path, model, opt, sched, state: TrainState, cfg, rank: int, sharded: bool) -> Interrupted:
    """Save where an interrupted run stands (rank 0; no barrier: the other ranks may be gone already)
    and say how to resume. FSDP: gathering the shards needs every rank, so the last checkpoint stays."""
    if not sharded and rank == 0:
        save_checkpoint(ckpt, model, opt, sched, state, cfg)
    kept = f"the checkpoint in {ckpt} (every {cfg.checkpoint_every} steps) stays" if sharded else \
        f"checkpoint saved to {ckpt}"
    return Interrupted(f"interrupted at step {state.step}; {kept}: run the same command again to resume")


def fit(model: torch.nn.Module, step: Step, cfg, checkpoint: str | Path | None = None, progress: bool = True,
        stop_after: int | None = None, metrics: MetricsLog | None = None,
        heldout: Callable[[], dict] | None = None, desc: str = "train", rank: int = 0, world: int = 1,
        sharded: bool = False) -> TrainState:
    """Train the trainable parameters of ``model`` for ``cfg.steps`` optimizer steps of ``step``.

    ``cfg``: a DistillConfig or SFTConfig (optimizer, schedule, steps, checkpoint_every, autocast;
    eval_every and cuda_graph where it has them). ``checkpoint``: resumed from when present, written
    every ``cfg.checkpoint_every`` steps and on Ctrl-C / SIGTERM; ``stop_after``: end this call after
    that many steps (to test resumption); ``heldout()``: the held-out KL, every ``cfg.eval_every``
    steps. Data parallel: rank 0 writes; ``sharded`` (FSDP) keeps the last checkpoint on interruption.
    """
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise RecoverLoraError("the student has no trainable parameters")
    graph_why = graphs.blocker(cfg, model, device, world)
    if graph_why and getattr(cfg, "cuda_graph", "off") == "on":
        raise RecoverLoraError(f"cuda_graph='on' but {graph_why}")
    opt, sched = _optimizer(params, cfg, device, graph_why is None)
    rise = getattr(cfg, "rewind_rise", 0.0)
    # the start a rewind goes back to: what the caller made (a resumed run makes the same start again);
    # kept in host memory, where full-KD's copy of every weight does not take the GPU's
    start = [p.detach().to("cpu", copy=True) for p in params] if rise else []
    ckpt = Path(checkpoint) if checkpoint else None
    state = load_checkpoint(ckpt, model, opt, sched, cfg) if ckpt and ckpt.exists() else TrainState()
    if state.step:
        log.info("%s: resumed from %s at step %d", desc, ckpt, state.step)
    if state.rewound_at:
        _rewound_schedule(sched, cfg, state.rewound_at)
        start = []
    metrics = metrics if rank == 0 else None
    if metrics is not None:
        metrics.resume(state.step)

    def one_step(xs) -> tuple[torch.Tensor, ...]:
        """One optimizer step over the micro-batches ``xs``; its outputs stay on the device."""
        opt.zero_grad(set_to_none=True)
        sums = None
        for a, x in enumerate(xs):
            outs = step.loss(x, len(xs), a == len(xs) - 1)
            sums = [o / len(xs) for o in outs] if sums is None else [s + o / len(xs) for s, o in zip(sums, outs)]
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        return tuple(sums)

    model.train()
    graphed, graph_lrs, try_graph = None, [], graph_why is None
    state.step_mode = "eager" + (f" ({graph_why})" if graph_why and getattr(cfg, "cuda_graph", "") == "auto" else "")
    bar = tqdm(total=cfg.steps, initial=state.step, desc=desc, unit="step", disable=not progress or rank != 0)
    start_step = state.step
    tokens = state.history[-1]["tokens"] if state.history else 0
    t0 = time.perf_counter() - state.elapsed
    with sigterm_as_interrupt(), lora_casts_off(model, autocast_on(cfg, device)):
        try:
            while state.step < cfg.steps and (stop_after is None or state.step - start_step < stop_after):
                xs = step.batches(state.step)
                if try_graph:  # one try a run
                    try_graph = False
                    graphed, graph_lrs = _capture(one_step, xs, params, opt, cfg, device, state)
                outs = graphed(xs) if graphed is not None else one_step(xs)
                # the step's one host sync
                means = mean_over_ranks(list(outs), device) if world > 1 else [float(o) for o in outs]
                _finite(means[0], state.step + 1)
                lr = cfg.lr * sched.lr_lambdas[0](state.step)
                sched.step()
                if graphed is not None:
                    graphs.keep_tensor_lrs(opt, graph_lrs)
                state.step += 1
                state.elapsed = time.perf_counter() - t0
                tokens += step.tokens(xs)
                _record(state, {"step": state.step, **dict(zip(step.names, means)), "lr": lr, "tokens": tokens,
                                "time": round(state.elapsed, 3)}, metrics, bar)
                ratio = loss_rise(state.history) if start and state.step <= cfg.steps // 2 else None
                if ratio is not None and ratio > rise:
                    _rewind(params, start, opt, sched, cfg, state)
                    start = []
                    bar.write(f"step {state.step}: the training loss ({RISE_WINDOW}-step mean) rose to {ratio:.2f}x "
                              f"its first {RISE_WINDOW} steps': back to the start, lr x {cfg.rewind_lr_scale:.3g}")
                    if metrics is not None:
                        metrics.log("rewind", {"step": state.step, "rise": round(ratio, 4),
                                               "lr_scale": cfg.rewind_lr_scale})
                if heldout is not None and cfg.eval_every and state.step % cfg.eval_every == 0 \
                        and state.step < cfg.steps:
                    _record(state, {"step": state.step, **heldout()}, metrics, bar, "heldout")
                if ckpt and cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0:
                    save_checkpoint(ckpt, model, opt, sched, state, cfg, rank, world)
        except KeyboardInterrupt:
            bar.close()
            if not ckpt:
                raise
            raise _interrupted(ckpt, model, opt, sched, state, cfg, rank, sharded) from None
        finally:
            bar.close()
    if ckpt:
        save_checkpoint(ckpt, model, opt, sched, state, cfg, rank, world)
    return state
