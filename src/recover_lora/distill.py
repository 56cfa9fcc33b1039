"""Stage 4, distill: LoRA adapters on the degraded model learn the reference's logits.

The distillation step: one teacher forward and one student forward per micro-batch and a chunked
full-vocabulary loss (optionally plus a layer loss), run by the one training loop
(:func:`recover_lora.training.loop.fit`: AdamW, warmup + cosine, gradient accumulation, bf16 autocast
on GPU, atomic checkpoints an interrupted run resumes from bit for bit), under DDP or FSDP when
torch.distributed is initialised.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from peft import PeftModel
from transformers import PreTrainedModel

from .adapters import attach, preset_plan
from .config import AdapterConfig, DistillConfig
from .forward import activation_checkpointing, base_model_of, hidden_states, lm_head_of, train_autocast
from .kl import KLMeter
from .metrics import MetricsLog
from .training import parallel
from .training.loop import Step, fit
from .training.losses import chunked_loss_backward, hidden_match_loss
from .training.state import TrainState, batch_indices
from .utils import RecoverLoraError


def attach_adapters(model: PreTrainedModel, cfg: AdapterConfig, seed: int = 0, reference=None,
                    calib_ids: torch.Tensor | None = None, **warm_start) -> PeftModel:
    """Wrap the degraded model with fresh LoRA adapters on ``cfg``'s modules (only they train): the
    preset as an :class:`~recover_lora.adapters.AdapterPlan` of uniform ranks, through the one
    :func:`~recover_lora.adapters.attach` (svd / eora starts need ``reference``; ``warm_start``:
    its calib_sequences / shrink)."""
    return attach(model, preset_plan(cfg, model), seed=seed, reference=reference, calib_ids=calib_ids, **warm_start)


def kd_step(student: torch.nn.Module, teacher: PreTrainedModel, train_ids: torch.Tensor, cfg: DistillConfig,
            rank: int = 0, world: int = 1, ddp: torch.nn.Module | None = None) -> Step:
    """The distillation step: this rank's slice of each global micro-batch (``batch_indices``), the
    teacher's and the student's hidden states, and the loss applied with both heads chunk by chunk."""
    device = next(teacher.parameters()).device
    local_bs, layers = cfg.batch_size // world, cfg.hidden_weight > 0
    # The whole token set on the device (tens of MB at paper scale: 100k x 128 int64 is 100 MB): no
    # host copy a step. A token set beyond 2 GB stays in (pinned) host memory instead.
    on_device = device.type == "cuda" and train_ids.numel() * train_ids.element_size() <= 2 * 2**30
    data = train_ids.to(device) if on_device else (train_ids.pin_memory() if device.type == "cuda" else train_ids)
    s_head, t_head = lm_head_of(base_model_of(student)), lm_head_of(teacher)

    def batches(step: int) -> list[torch.Tensor]:
        out = []
        for a in range(cfg.grad_accum):
            idx = batch_indices(len(train_ids), cfg.batch_size, step * cfg.grad_accum + a, cfg.seed)
            out.append(data[idx[rank * local_bs:(rank + 1) * local_bs].to(data.device)].to(device, non_blocking=True))
        return out

    def loss(x: torch.Tensor, n: int, last: bool) -> tuple[torch.Tensor, ...]:
        # DDP all-reduces gradients on the last micro-batch of the step only.
        sync = ddp.no_sync() if ddp is not None and not last else contextlib.nullcontext()
        with sync, train_autocast(cfg, device):
            with torch.no_grad():
                ht = hidden_states(teacher, x, layers)
            hs = ddp(x) if ddp is not None else hidden_states(student, x, layers)
            extra = hid = None
            if layers:  # intermediate layers (not the embeddings, not the final state the KL sees)
                h = hidden_match_loss(hs[1:-1], ht[1:-1])
                extra, hid = h * (cfg.hidden_weight / n), h.detach()
                hs, ht = hs[-1], ht[-1]
            l, t = chunked_loss_backward(hs, ht, s_head, t_head, cfg.loss, cfg.temperature, cfg.chunk_tokens,
                                         scale=1.0 / n, as_tensors=True, teacher_topk=cfg.teacher_topk,
                                         extra_loss=extra)
            del hs, ht, extra
        return (l, t, hid) if layers else (l, t)

    return Step(batches, loss, ("loss", "top1", "hidden_loss") if layers else ("loss", "top1"),
                lambda xs: sum(x.numel() for x in xs) * world)


def train(student: torch.nn.Module, teacher: PreTrainedModel, train_ids: torch.Tensor, cfg: DistillConfig,
          heldout_ids: torch.Tensor | None = None, checkpoint: str | Path | None = None,
          progress: bool = True, stop_after: int | None = None, metrics: MetricsLog | None = None) -> TrainState:
    """Distill ``teacher`` into the trainable parameters of ``student``.

    ``metrics``: each step's numbers (and each held-out measurement) streamed there as they come.

    With ``checkpoint`` set, resumes from it when present and writes it every
    ``cfg.checkpoint_every`` steps and on interruption (Ctrl-C, SIGTERM). ``stop_after`` ends the
    run early after that many steps of this call (used to test resumption).

    Data parallel: when torch.distributed is initialised (torchrun / accelerate launch, see
    :func:`~recover_lora.training.parallel.init_distributed`), the student runs under DDP (gloo on CPU,
    NCCL on GPU). Each rank takes its contiguous slice of every global micro-batch from
    :func:`~recover_lora.training.state.batch_indices`, so the global batch, its order, and (without
    dropout) the adapter equal a one-process run's up to floating-point summation order;
    ``cfg.batch_size`` is the global batch and must divide by the world size. The logged loss and
    top-1 are averaged over ranks, and only rank 0 writes checkpoints (all ranks read them on
    resume). With ``cfg.fsdp`` the decoder layers of both models are sharded across the ranks
    (FSDP2) instead: the same math, 1/world of the layer weights per rank while training (each rank
    still loads the models whole); checkpoints hold whole tensors either way, so DDP, FSDP and
    single-process runs resume each other's.
    """
    cfg.validate()
    n_layers = getattr(getattr(base_model_of(student), "config", None), "num_hidden_layers", None)
    if cfg.hidden_weight > 0 and n_layers is not None and n_layers < 2:
        raise RecoverLoraError(f"hidden_weight needs intermediate layers to match; the model has {n_layers} decoder layer")
    device = next(teacher.parameters()).device
    rank, world = parallel.dist_rank_world()
    if cfg.batch_size % world:
        raise RecoverLoraError(f"batch_size {cfg.batch_size} must be a multiple of the {world} processes")
    if not any(p.requires_grad for p in student.parameters()):
        raise RecoverLoraError("the student has no trainable parameters")
    sharded = parallel.ShardedLayers([teacher, student], device, world) if cfg.fsdp and world > 1 else None
    # (DDP broadcasts rank 0's parameters; a resume then loads the same checkpoint on every rank)
    ddp = parallel.ddp(student, device, cfg.hidden_weight > 0) if world > 1 and sharded is None else None
    meter = None

    def heldout() -> dict:
        nonlocal meter
        meter = meter or KLMeter(teacher, heldout_ids, cfg.eval_batch_size, cfg)
        return meter(student)

    student.train()
    teacher.eval()
    if cfg.activation_checkpointing:
        activation_checkpointing(student, True)
    try:
        state = fit(student, kd_step(student, teacher, train_ids, cfg, rank, world, ddp), cfg, checkpoint, progress,
                    stop_after, metrics, heldout if heldout_ids is not None else None, "distill", rank, world,
                    sharded is not None)
    finally:
        if cfg.activation_checkpointing:
            activation_checkpointing(student, False)
    if sharded is not None:
        sharded.restore()
    return state
