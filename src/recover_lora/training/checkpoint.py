"""Atomic training checkpoints: trainable tensors, optimizer, scheduler, RNG, state and settings.

Checkpoints hold whole tensors (FSDP shards gathered) and float learning rates (a CUDA-graph run
keeps tensor ones), so single-process, DDP, FSDP and graphed runs resume each other's. A resume
refuses other settings that change the math (the cadence fields may change).
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, fields
from pathlib import Path

import torch

from ..utils import RecoverLoraError, atomic_torch_save
from .state import TrainState

# Settings that may change on resume (when things are measured or written, how memory is spent);
# anything that changes the math may not.
CADENCE_FIELDS = ("eval_every", "eval_batch_size", "checkpoint_every", "chunk_tokens", "cuda_graph",
                  "activation_checkpointing", "fsdp")


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A whole tensor from an FSDP shard (a collective: every rank must call it), else ``t``."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _plain(x):
    """Tensor learning rates (CUDA-graph mode) as floats, so any mode can resume any checkpoint."""
    if torch.is_tensor(x):
        return float(x)
    if isinstance(x, list):
        return [_plain(v) for v in x]
    return x


def checkpoint_payload(model: torch.nn.Module, opt, sched, state: TrainState, cfg) -> dict:
    """What a checkpoint holds: whole tensors (FSDP shards gathered: call it on every rank), float lrs."""
    opt_sd = opt.state_dict()
    opt_sd["param_groups"] = [{k: _plain(v) if k in ("lr", "initial_lr") else v for k, v in g.items()}
                              for g in opt_sd["param_groups"]]
    # new dicts: state_dict() hands out the optimizer's own per-parameter state
    opt_sd["state"] = {i: {k: full_tensor(v) if torch.is_tensor(v) else v for k, v in st.items()}
                       for i, st in opt_sd["state"].items()}
    sched_sd = {k: _plain(v) if k in ("base_lrs", "_last_lr") else v for k, v in sched.state_dict().items()}
    return {
        "trainable": {n: full_tensor(p.detach()).cpu().clone() for n, p in model.named_parameters() if p.requires_grad},
        "optimizer": opt_sd,
        "scheduler": sched_sd,
        "state": asdict(state),
        "config": asdict(cfg),
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def save_checkpoint(path: Path, model: torch.nn.Module, opt, sched, state: TrainState, cfg,
                    rank: int = 0, world: int = 1) -> None:
    """Rank 0 writes (under FSDP every rank gathers first); the other ranks wait until it has."""
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for p in model.parameters()):  # FSDP: every rank gathers, rank 0 writes
        payload = checkpoint_payload(model, opt, sched, state, cfg)
        if rank == 0:
            atomic_torch_save(payload, path)
    elif rank == 0:
        atomic_torch_save(checkpoint_payload(model, opt, sched, state, cfg), path)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()  # a rank that resumes later finds the file complete


def _read(path: Path, cfg) -> dict:
    """The checkpoint's contents, refused when it is not one or was made with other settings."""
    # weights_only: a checkpoint is tensors and plain types; a planted pickle must not run code here.
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for a foreign pickle, RuntimeError/EOFError for a torn file
        raise RecoverLoraError(f"{path} is not a recover-lora checkpoint that loads safely ({type(e).__name__}: "
                               f"{(str(e).splitlines() or [''])[0][:200]}); delete it to start over") from None
    if not isinstance(ck, dict) or not {"trainable", "optimizer", "scheduler", "state", "config"} <= set(ck):
        raise RecoverLoraError(f"{path} is not a recover-lora checkpoint; delete it to start over")
    old, new = dict(ck["config"]), asdict(cfg)
    for k in CADENCE_FIELDS:
        old.pop(k, None)
        new.pop(k, None)
    # A setting added after the checkpoint was written had its default then: an older checkpoint
    # stays resumable under the default, and only under it.
    for f in fields(cfg):
        if f.name in new and f.name not in old and f.default is not MISSING:
            old[f.name] = f.default
    if old != new:
        diff = {k: (old.get(k), new.get(k)) for k in set(old) | set(new) if old.get(k) != new.get(k)}
        raise RecoverLoraError(f"checkpoint {path} was made with other training settings {diff}; "
                               "resume with the same settings or use a new output folder")
    return ck


def load_checkpoint(path: Path, model: torch.nn.Module, opt, sched, cfg) -> TrainState:
    """Put a checkpoint back into ``model`` (its trainable tensors), ``opt``, ``sched`` and the RNGs."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    ck = _read(path, cfg)

    def local(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:  # whole tensor -> like's layout
        t = t.to(like.device, like.dtype)
        return distribute_tensor(t, like.device_mesh, like.placements) if isinstance(like, DTensor) else t

    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in ck["trainable"].items():
            params[n].copy_(local(t, params[n]))
    opt.load_state_dict(ck["optimizer"])
    for group in opt.param_groups:  # FSDP: moments as shards of their parameter
        for p in group["params"]:
            st = opt.state.get(p, {})
            for k, v in st.items():
                if isinstance(p, DTensor) and torch.is_tensor(v) and not isinstance(v, DTensor) and v.shape == p.shape:
                    st[k] = local(v, p)
    sched.load_state_dict(ck["scheduler"])
    torch.set_rng_state(ck["rng_cpu"])
    if ck.get("rng_cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ck["rng_cuda"])
    return TrainState(**ck["state"])
