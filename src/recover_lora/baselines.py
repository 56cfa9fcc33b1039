"""The paper's comparison points, runnable from the same pipeline.

- **full-KD** ("LLM-QAT*" in the paper): the same distillation (data, loss, steps, schedule,
  :func:`distill.train`) into *all* parameters of the degraded model, no LoRA.

      state = run_full_kd(reference, degraded, train_ids, DistillConfig(steps=600), heldout_ids,
                          "runs/fk/checkpoint.pt", FullKDConfig(lr=2e-5))

- **SFT-LoRA**: supervised LoRA fine-tuning on labeled data: the *train* splits of benchmark
  tasks (ARC-Easy, ARC-Challenge, OpenBookQA and PIQA ship one), each record formatted exactly as
  the evaluation formats it (context + target delimiter + gold choice), cross-entropy on the gold
  continuation tokens only, AdamW with the distillation's warmup + cosine schedule, on whatever
  adapters the student carries (the pipeline attaches them with the same placement as recover-lora).

      student = attach_adapters(degraded, AdapterConfig(modules="attn-mlp"))
      result = run_sft_lora(student, tok, ["arc_easy", "piqa"], "../shared/eval-data", SFTConfig())
"""

from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .distill import (DistillConfig, TrainState, train_autocast, autocast_on, base_model_of, lm_head_of,
                      lora_casts_off, batch_indices, hidden_states, load_checkpoint, lr_lambda,
                      save_checkpoint, trainable_parameters, train)
from .synth import dist_rank_world
from .utils import RecoverLoraError, log, sigterm_as_interrupt
from .config import SFT_DEFAULT_TASKS, FullKDConfig, SFTConfig  # noqa: F401 - re-exported

METHODS = ("recover-lora", "full-kd", "sft-lora")


# ---------------------------------------------------------------- full-KD (LLM-QAT*)


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
    """Distill ``reference`` into all parameters of ``degraded`` (in place) with :func:`distill.train`:
    same data order, loss, steps, warmup + cosine schedule, clipping and checkpoint/resume as
    recover-lora; only the learning rate comes from ``cfg``. Single process only."""
    cfg = cfg or FullKDConfig()
    if dist_rank_world()[1] > 1:
        # distill.train applies the LM head outside the DDP module, so its gradient (untied) or
        # part of it (tied) would never be all-reduced.
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


# ---------------------------------------------------------------- SFT-LoRA


@dataclass
class SFTExample:
    task: str
    ids: list[int]
    n_context: int  # loss on ids[n_context:]


def _train_split(task, data_dir, source: str, limit: int | None):
    from .evaluate.data import load_split

    if source in ("auto", "local") and data_dir:
        path = Path(data_dir) / task.local_dir / "train.jsonl"
        if not path.is_file():
            raise RecoverLoraError(f"sft-lora: task {task.name} has no train split ({path} not found); "
                                   f"train splits exist for {', '.join(SFT_DEFAULT_TASKS)}")
    try:
        return load_split(task, "train", data_dir, source, limit)
    except RecoverLoraError as e:
        msg = str(e)
        raise RecoverLoraError(msg if task.name in msg else f"sft-lora: task {task.name}: {msg}") from None


def build_sft_examples(tokenizer: PreTrainedTokenizerBase, tasks: Sequence[str] | str, data_dir: str | Path | None,
                       cfg: SFTConfig | None = None, model_config=None) -> tuple[list[SFTExample], list[str]]:
    """Token ids of (context + " " + gold choice) for every train record, formatted and tokenized
    as the evaluation does (``Task.format``, ``encode_pairs``, BOS by ``load.needs_bos``).
    Returns the examples and the tasks skipped for lack of a train split (``cfg.skip_missing``)."""
    from .evaluate.scorer import encode_pairs
    from .evaluate.tasks import get_task, parse_tasks
    from .load import needs_bos

    cfg = cfg or SFTConfig()
    add_bos = needs_bos(tokenizer, model_config) if model_config is not None else False
    examples: list[SFTExample] = []
    skipped: list[str] = []
    for name in parse_tasks(tasks):
        task = get_task(name)
        try:
            split = _train_split(task, data_dir, cfg.source, cfg.limit_per_task)
        except RecoverLoraError as e:
            if not cfg.skip_missing:
                raise
            log.warning("%s; skipped", e)
            skipped.append(name)
            continue
        pairs = []
        for doc in split.docs:
            f = task.format(doc)
            pairs.append((f.contexts[f.gold], f.continuations[f.gold]))
        for ctx, cont in encode_pairs(tokenizer, pairs, add_bos):
            ids = list(ctx) + list(cont)
            cut = max(0, len(ids) - cfg.max_len)
            if len(cont) == 0:
                continue
            examples.append(SFTExample(name, ids[cut:], max(1, len(ctx) - cut)))
    if not examples:
        raise RecoverLoraError(f"sft-lora: no training examples in tasks {list(tasks)}")
    return examples, skipped


def _batch(examples: Sequence[SFTExample], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and the mask of predicted positions (position p predicts ids[p + 1])."""
    L = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), L), pad_id, dtype=torch.long)
    pred = torch.zeros((len(examples), L), dtype=torch.bool)
    for i, e in enumerate(examples):
        ids[i, :len(e.ids)] = torch.tensor(e.ids)
        pred[i, e.n_context - 1:len(e.ids) - 1] = True
    return ids, pred


def _gold_loss(model: torch.nn.Module, ids: torch.Tensor, pred: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy of the gold continuation tokens (the LM head only at those positions).
    Right padding is invisible to real tokens under causal attention, so no mask is needed."""
    h = hidden_states(model, ids)
    logits = lm_head_of(base_model_of(model))(h[pred]).float()
    targets = ids[:, 1:][pred[:, :-1]]
    return F.cross_entropy(logits, targets, reduction="sum"), int(targets.numel())


@torch.no_grad()
def gold_nll(model: torch.nn.Module, examples: Sequence[SFTExample], batch_size: int = 16,
             pad_id: int = 0, cfg: SFTConfig | None = None) -> float:
    """Mean cross-entropy per gold-continuation token (nats)."""
    cfg = cfg or SFTConfig()
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    for i in range(0, len(examples), batch_size):
        ids, pred = _batch(examples[i:i + batch_size], pad_id)
        with train_autocast(cfg, device):
            s, k = _gold_loss(model, ids.to(device), pred.to(device))
        total += s.item()
        n += k
    model.train(was_training)
    return total / max(n, 1)


def run_sft_lora(student: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
                 tasks: Sequence[str] | str | None = None, data_dir: str | Path | None = None,
                 cfg: SFTConfig | None = None, checkpoint: str | Path | None = None,
                 progress: bool = True, stop_after: int | None = None, metrics=None) -> dict:
    """Fine-tune the trainable (LoRA) parameters of ``student`` on the gold answers of the tasks'
    train splits. ``tasks`` / ``data_dir`` default to ``cfg``'s. Resumes from ``checkpoint``
    like :func:`distill.train` (same batch order, bit-for-bit). Single process. Returns a
    summary: examples per task, skipped tasks, steps, loss curve, gold NLL before/after."""
    cfg = copy.deepcopy(cfg or SFTConfig())
    if tasks is not None:
        cfg.tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    if data_dir is not None:
        cfg.data_dir = str(data_dir)
    if cfg.batch_size < 1 or cfg.lr <= 0 or cfg.steps < 0 or cfg.epochs < 1:
        raise RecoverLoraError("sft-lora: batch_size and epochs must be >= 1, lr > 0, steps >= 0")
    if dist_rank_world()[1] > 1:
        raise RecoverLoraError("sft-lora runs in a single process; launch it without torchrun")
    params = [p for p in student.parameters() if p.requires_grad]
    if not params:
        raise RecoverLoraError("sft-lora: the student has no trainable parameters (attach adapters first)")
    base = base_model_of(student)
    examples, skipped = build_sft_examples(tokenizer, cfg.tasks, cfg.data_dir, cfg, base.config)
    per_task: dict[str, int] = {}
    for e in examples:
        per_task[e.task] = per_task.get(e.task, 0) + 1
    bs = min(cfg.batch_size, len(examples))
    steps = cfg.steps or cfg.epochs * (len(examples) // bs)
    sched_cfg = replace(cfg, steps=steps)  # lr_lambda reads steps / warmup_steps / min_lr_ratio
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    device = next(student.parameters()).device
    monitor = examples[:cfg.monitor_examples]
    nll_before = gold_nll(student, monitor, bs, pad_id, cfg) if monitor else None

    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999),
                            fused=device.type == "cuda")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(sched_cfg))
    ckpt = Path(checkpoint) if checkpoint else None
    state = TrainState()
    if ckpt and ckpt.exists():
        state = load_checkpoint(ckpt, student, opt, sched, cfg)
        log.info("sft-lora: resumed from %s at step %d", ckpt, state.step)
    student.train()
    t0 = time.perf_counter() - state.elapsed
    if metrics is not None:
        metrics.resume(state.step)
    start = state.step
    bar = tqdm(total=steps, initial=state.step, desc="sft-lora", unit="step", disable=not progress)
    with sigterm_as_interrupt(), lora_casts_off(student, autocast_on(cfg, device)):
        try:
            while state.step < steps:
                if stop_after is not None and state.step - start >= stop_after:
                    break
                idx = batch_indices(len(examples), bs, state.step, cfg.seed)
                ids, pred = _batch([examples[int(i)] for i in idx], pad_id)
                ids, pred = ids.to(device), pred.to(device)
                opt.zero_grad(set_to_none=True)
                with train_autocast(cfg, device):
                    loss_sum, k = _gold_loss(student, ids, pred)
                    loss = loss_sum / max(k, 1)
                if not torch.isfinite(loss):  # before the step, so the weights stay as they were
                    raise RecoverLoraError(f"the loss is not finite ({loss.item()}) at step {state.step + 1}; "
                                           f"stopped (the checkpoint {ckpt} of an earlier step stays)")
                loss.backward()
                if cfg.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                lr = sched.get_last_lr()[0]
                opt.step()
                sched.step()
                state.step += 1
                state.elapsed = time.perf_counter() - t0
                state.history.append({"step": state.step, "loss": loss.item(), "lr": lr, "tokens": k,
                                      "time": round(state.elapsed, 3)})
                if metrics is not None:
                    metrics.log("train", state.history[-1])
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.4f}")
                if ckpt and cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0:
                    save_checkpoint(ckpt, student, opt, sched, state, cfg)
        except KeyboardInterrupt:
            if ckpt:
                save_checkpoint(ckpt, student, opt, sched, state, cfg)
                raise RecoverLoraError(f"interrupted at step {state.step}; checkpoint saved to {ckpt}: "
                                       "run the same command again to resume") from None
            raise
        finally:
            bar.close()
    if ckpt:
        save_checkpoint(ckpt, student, opt, sched, state, cfg)
    nll_after = gold_nll(student, monitor, bs, pad_id, cfg) if monitor else None
    return {"method": "sft-lora", "tasks": per_task, "skipped": skipped, "examples": len(examples),
            "steps": state.step, "batch_size": bs, "history": state.history,
            "loss_tokens": sum(h["tokens"] for h in state.history),
            "trainable_parameters": trainable_parameters(student),
            "nll_before": nll_before, "nll_after": nll_after, "seconds": round(state.elapsed, 2),
            "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}}
