"""full-KD ("LLM-QAT*" in the paper): the same distillation (data, loss, steps, schedule, the one
loop) into *all* parameters of the degraded model, no LoRA; only the learning rate is its own.

    state = run_full_kd(reference, degraded, train_ids, DistillConfig(steps=600), heldout_ids,
                        "runs/fk/checkpoint.pt", FullKDConfig(lr=2e-5))
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, replace
from pathlib import Path
from typing import Iterator

import torch
from transformers import PreTrainedModel

from ..config import DistillConfig, FullKDConfig
from ..distill import train
from ..forward import trainable_parameters
from ..training.parallel import dist_rank_world
from ..training.state import TrainState
from ..utils import RecoverLoraError, log
from .base import Method


def prepare_full_kd(degraded: PreTrainedModel, reference: PreTrainedModel | None = None,
                    cfg: FullKDConfig | None = None) -> int:
    """Make every parameter of ``degraded`` trainable (in place); returns their count.

    Tied input/output embeddings are one parameter and train once. Refuses a degraded model that
    shares a tensor with the reference (training would move the teacher too).
    """
    cfg = cfg or FullKDConfig()
    from peft import PeftModel

    if isinstance(degraded, PeftModel):
        raise RecoverLoraError("full-kd trains the plain degraded model: do not attach adapters")
    if reference is not None:
        teacher = {p.data_ptr() for p in reference.parameters()}
        shared = [n for n, p in degraded.named_parameters() if p.data_ptr() in teacher]
        if shared:
            raise RecoverLoraError(f"full-kd: the degraded model shares tensors with the reference "
                                   f"({', '.join(shared[:3])}...); load or copy it separately")
    if cfg.fp32_master and any(p.dtype in (torch.bfloat16, torch.float16) for p in degraded.parameters()):
        degraded.float()
    for p in degraded.parameters():
        p.requires_grad_(True)
    if not cfg.train_embeddings:
        degraded.get_input_embeddings().weight.requires_grad_(False)
    return trainable_parameters(degraded)


def full_kd_distill_config(distill_cfg: DistillConfig, cfg: FullKDConfig | None = None) -> DistillConfig:
    """The distillation settings full-KD trains with: recover-lora's, with full-KD's learning rate."""
    return replace(distill_cfg, lr=(cfg or FullKDConfig()).lr)


def run_full_kd(reference: PreTrainedModel, degraded: PreTrainedModel, train_ids: torch.Tensor,
                distill_cfg: DistillConfig, heldout_ids: torch.Tensor | None = None,
                checkpoint: str | Path | None = None, cfg: FullKDConfig | None = None,
                progress: bool = True, stop_after: int | None = None, metrics=None) -> TrainState:
    """Distill ``reference`` into all parameters of ``degraded`` (in place). Single process only."""
    cfg = cfg or FullKDConfig()
    if dist_rank_world()[1] > 1:
        # the distillation step applies the LM head outside the DDP module, so its gradient
        # (untied) or part of it (tied) would never be all-reduced.
        raise RecoverLoraError("full-kd runs in a single process; launch it without torchrun")
    n = prepare_full_kd(degraded, reference, cfg)
    log.info("full-KD: %d trainable parameters, lr %g", n, cfg.lr)
    return train(degraded, reference, train_ids, full_kd_distill_config(distill_cfg, cfg), heldout_ids,
                 checkpoint, progress=progress, stop_after=stop_after, metrics=metrics)


def snapshot_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of the weights (to evaluate the degraded model after full-KD changed it)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


@contextlib.contextmanager
def degraded_view(student: torch.nn.Module, snapshot: dict[str, torch.Tensor] | None = None) -> Iterator[None]:
    """The degraded model inside the block: adapters disabled for a PEFT student, or, for a
    full-KD student, the ``snapshot`` weights swapped in (and the trained ones restored after)."""
    from peft import PeftModel

    if isinstance(student, PeftModel):
        with student.disable_adapter():
            yield
        return
    if snapshot is None:
        raise RecoverLoraError("a full-KD student needs a snapshot of the degraded weights")
    trained = snapshot_state(student)
    dtype = {k: v.dtype for k, v in student.state_dict().items()}
    with torch.no_grad():
        student.load_state_dict({k: v.to(dtype[k]) for k, v in snapshot.items()})
    try:
        yield
    finally:
        with torch.no_grad():
            student.load_state_dict(trained)


def _student(r) -> None:
    """The degraded model itself, every weight trainable (a snapshot kept to evaluate it as it was)."""
    r.snapshot = snapshot_state(r.degraded) if r.cfg.eval.tasks and r.rank == 0 else None
    r.student = r.degraded
    r.n_train = prepare_full_kd(r.student, r.reference, r.cfg.full_kd)


def _train(r, metrics):
    return run_full_kd(r.reference, r.student, r.train_ids, r.cfg.distill, r.held_ids, r.out / "checkpoint.pt",
                       r.cfg.full_kd, progress=r.progress, metrics=metrics), None


METHOD = Method("full-kd", adapters=False, synthetic=True, student=_student, train=_train,
                identity=lambda cfg: {"full_kd": asdict(cfg.full_kd)})
