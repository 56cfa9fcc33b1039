"""A whole training step (forward, loss, backward, clipping, AdamW) replayed as one CUDA graph.

A LoRA distillation step on a small model is bound by the host: thousands of small kernels a
step, each launched from Python (measured: about 0.24 s a step on an H100 whatever the batch).
Replaying the step as one CUDA graph removes that cost. This follows PyTorch's "whole network
capture" recipe (https://pytorch.org/docs/stable/notes/cuda.html#whole-network-capture):

1. warm up the step a few times on a side stream (lazy initialisation: optimizer state, cuBLAS
   handles, autograd streams), then put parameters and optimizer state back as they were, so
   the warm-up leaves no trace on the training run;
2. capture the step on static input buffers (gradients start as ``None``, so the captured
   backward *writes* them, and each replay overwrites them);
3. check the capture: replay it once on the warm-up batch and compare loss and updated
   parameters with the eager first warm-up step, then restore again. A capture that disagrees is
   thrown away and the caller falls back to the eager step, so a graph never silently changes
   the math.

Requirements on ``fn``: static shapes, no host syncs (no ``.item()``), no autocast weight cache
(``cache_enabled=False``), an optimizer built with ``capturable=True`` and a tensor learning
rate (a float would be frozen into the graph), no dropout RNG.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch

from ..utils import log

StepFn = Callable[[Sequence[torch.Tensor]], tuple[torch.Tensor, ...]]


def _snapshot(params: list[torch.Tensor], opt: torch.optim.Optimizer) -> dict:
    """Copies of the parameters and of whatever optimizer state exists now."""
    return {"params": [p.detach().clone() for p in params],
            "state": {id(p): {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in opt.state[p].items()}
                      for p in params if p in opt.state}}


@torch.no_grad()
def _restore(snap: dict, params: list[torch.Tensor], opt: torch.optim.Optimizer) -> None:
    """Put parameters and optimizer state back *in place* (a captured graph holds their addresses).

    State that the warm-up created (a fresh run) is zeroed: AdamW's lazily created state is
    step 0 with zero moments, so zeros are the same as "not created yet".
    """
    for p, saved in zip(params, snap["params"]):
        p.copy_(saved)
    for p in params:
        old = snap["state"].get(id(p))
        for k, v in opt.state.get(p, {}).items():
            if not torch.is_tensor(v):
                continue
            if old is not None and k in old:
                v.copy_(old[k])
            else:
                v.zero_()


def _close(a: list[torch.Tensor], b: list[torch.Tensor], rtol: float) -> bool:
    """||a - b|| <= rtol ||b|| over all tensors together, and a finite."""
    a = torch.cat([t.detach().float().flatten() for t in a])
    b = torch.cat([t.detach().float().flatten() for t in b])
    return bool(torch.isfinite(a).all()) and float((a - b).norm()) <= rtol * max(float(b.norm()), 1e-12)


def _cuda_capture(fn: StepFn, static_inputs: list[torch.Tensor], opt: torch.optim.Optimizer):
    """Capture ``fn(static_inputs)``; returns (replay, static outputs, graph)."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(static_inputs)
    return graph.replay, out, graph


def _eager_capture(fn: StepFn, static_inputs: list[torch.Tensor], opt: torch.optim.Optimizer):
    """Stand-in for :func:`_cuda_capture` where there is no GPU: "replay" calls the step again,
    writing into the same output tensors and, like a graph, reading the learning-rate objects
    that were in place at capture time. Tests use it to check everything around the capture."""
    out = fn(static_inputs)
    lrs = [g["lr"] for g in opt.param_groups]

    def replay() -> None:
        now = [g["lr"] for g in opt.param_groups]
        for g, lr in zip(opt.param_groups, lrs):
            g["lr"] = lr
        try:
            for o, n in zip(out, fn(static_inputs)):
                o.copy_(n)
        finally:
            for g, lr in zip(opt.param_groups, now):
                g["lr"] = lr
    return replay, out, None


# Swapped for _eager_capture by the CPU tests.
capture_impl = _cuda_capture


class GraphedStep:
    """``step(inputs)`` copies ``inputs`` into the static buffers, replays, returns the outputs.

    The returned tensors are the graph's static outputs: the next replay overwrites them.
    """

    def __init__(self, replay: Callable[[], None], static_inputs: list[torch.Tensor],
                 static_outputs: tuple[torch.Tensor, ...], graph=None):
        self.replay, self.static_inputs, self.static_outputs = replay, static_inputs, static_outputs
        self.graph = graph  # keeps the CUDA graph (and its memory pool) alive

    def __call__(self, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        for buf, x in zip(self.static_inputs, inputs):
            buf.copy_(x, non_blocking=True)
        self.replay()
        return self.static_outputs


def capture_step(fn: StepFn, example_inputs: Sequence[torch.Tensor], params: list[torch.Tensor],
                 opt: torch.optim.Optimizer, warmup: int = 3, rtol: float = 2e-2) -> tuple[GraphedStep | None, str | None]:
    """Capture one training step as a graph; returns (step, None) or (None, why it fell back).

    ``fn(inputs)`` must run a whole optimizer step (zero_grad(set_to_none=True) first) and
    return tensors, the loss first. Parameters and optimizer state are the same after this call
    as before it, whether or not the capture worked.
    """
    snap = _snapshot(params, opt)
    static = [x.detach().clone() for x in example_inputs]
    cuda = capture_impl is _cuda_capture
    try:
        # 1. warm-up (side stream on GPU, as the recipe asks), remembering the first step's result
        stream = torch.cuda.Stream() if cuda else None
        if cuda:
            stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream) if cuda else contextlib.nullcontext():
            for i in range(max(1, warmup)):
                out = fn(static)
                if i == 0:
                    ref_loss = out[0].detach().clone()
                    ref_params = [p.detach().clone() for p in params]
        if cuda:
            torch.cuda.current_stream().wait_stream(stream)
        _restore(snap, params, opt)
        # 2. capture: gradients start as None, so the captured backward writes them afresh
        opt.zero_grad(set_to_none=True)
        replay, static_out, graph = capture_impl(fn, static, opt)
        # 3. check: one replay from the restored state must redo the eager first step
        _restore(snap, params, opt)
        replay()
        # Adam's first update is about lr * sign(grad): elements whose gradient is ~0 may flip
        # between two runs of atomics-based kernels, hence the looser bound on the update.
        ok = _close([static_out[0]], [ref_loss], rtol) and _close(
            [p.detach() - s for p, s in zip(params, snap["params"])],
            [r - s for r, s in zip(ref_params, snap["params"])], max(rtol, 0.1))
        _restore(snap, params, opt)
        if not ok:
            return None, (f"graph replay disagrees with the eager step (loss {float(static_out[0]):.6g} vs "
                          f"{float(ref_loss):.6g})")
        return GraphedStep(replay, static, tuple(static_out), graph), None
    except Exception as e:  # noqa: BLE001 - any capture failure means: run eagerly
        _restore(snap, params, opt)
        opt.zero_grad(set_to_none=True)
        log.warning("CUDA graph capture of the training step failed, training eagerly: %s", e)
        return None, f"{type(e).__name__}: {str(e)[:300]}"


def blocker(cfg, model: torch.nn.Module, device: torch.device, world: int) -> str | None:
    """Why the training step cannot be a CUDA graph here (None: it can). ``cfg.cuda_graph``: auto | on | off
    (a config without the field: off)."""
    if getattr(cfg, "cuda_graph", "off") == "off":
        return "cuda_graph='off'"
    if device.type != "cuda" and capture_impl is _cuda_capture:
        return "not on a CUDA device"
    if world > 1:
        return "data-parallel run (DDP all-reduce is not captured)"
    if any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules()):
        return "dropout (its random numbers are not captured)"
    return None


def keep_tensor_lrs(opt: torch.optim.Optimizer, tensors: list[torch.Tensor]) -> None:
    """The captured step reads the lr tensors it was captured with: should the scheduler have put a
    new object in a param group (a float, in torch versions that do not fill tensor lrs in place),
    copy its value into the captured tensor and put that back."""
    for g, t in zip(opt.param_groups, tensors):
        if g["lr"] is not t:
            t.fill_(float(g["lr"]))
            g["lr"] = t
