"""SFT-LoRA: supervised LoRA fine-tuning on labeled data, the comparison point that needs labels.

The *train* splits of benchmark tasks (ARC-Easy, ARC-Challenge, OpenBookQA and PIQA ship one), each
record formatted exactly as the evaluation formats it (context + target delimiter + gold choice),
cross-entropy on the gold continuation tokens only, run by the one training loop (AdamW, the
distillation's warmup + cosine schedule, checkpoints) on the adapters the pipeline attaches with
recover-lora's placement.

    student = attach_adapters(degraded, AdapterConfig(modules="attn-mlp"))
    result = run_sft_lora(student, tok, ["arc_easy", "piqa"], "../shared/eval-data", SFTConfig())
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from ..config import SFT_DEFAULT_TASKS, SFTConfig
from ..forward import base_model_of, hidden_states, lm_head_of, train_autocast, trainable_parameters
from ..training.loop import Step, fit
from ..training.parallel import dist_rank_world
from ..training.state import batch_indices
from ..utils import RecoverLoraError, log
from .base import Method
from .recover_lora import adapter_identity, adapter_student


@dataclass
class SFTExample:
    task: str
    ids: list[int]
    n_context: int  # loss on ids[n_context:]


def _train_split(task, data_dir, source: str, limit: int | None):
    from ..evaluate.data import load_split

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
    from ..evaluate.scorer import encode_pairs
    from ..evaluate.tasks import get_task, parse_tasks
    from ..load import needs_bos

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
    (same batch order, bit for bit). Single process. Returns a summary: examples per task, skipped
    tasks, steps, loss curve, gold NLL before/after."""
    cfg = copy.deepcopy(cfg or SFTConfig())
    if tasks is not None:
        cfg.tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    if data_dir is not None:
        cfg.data_dir = str(data_dir)
    if cfg.batch_size < 1 or cfg.lr <= 0 or cfg.steps < 0 or cfg.epochs < 1:
        raise RecoverLoraError("sft-lora: batch_size and epochs must be >= 1, lr > 0, steps >= 0")
    if dist_rank_world()[1] > 1:
        raise RecoverLoraError("sft-lora runs in a single process; launch it without torchrun")
    if not any(p.requires_grad for p in student.parameters()):
        raise RecoverLoraError("sft-lora: the student has no trainable parameters (attach adapters first)")
    examples, skipped = build_sft_examples(tokenizer, cfg.tasks, cfg.data_dir, cfg, base_model_of(student).config)
    per_task: dict[str, int] = {}
    for e in examples:
        per_task[e.task] = per_task.get(e.task, 0) + 1
    bs = min(cfg.batch_size, len(examples))
    steps = cfg.steps or cfg.epochs * (len(examples) // bs)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    device = next(student.parameters()).device
    monitor = examples[:cfg.monitor_examples]
    nll_before = gold_nll(student, monitor, bs, pad_id, cfg) if monitor else None

    def batches(step: int) -> list:
        ids, pred = _batch([examples[int(i)] for i in batch_indices(len(examples), bs, step, cfg.seed)], pad_id)
        return [(ids.to(device), pred.to(device))]

    def loss(batch, n: int, last: bool) -> tuple[torch.Tensor]:
        with train_autocast(cfg, device):
            loss_sum, k = _gold_loss(student, *batch)
            mean = loss_sum / max(k, 1)
        mean.backward()
        return (mean.detach(),)

    # the schedule runs over the steps the examples give (cfg.steps 0: epochs of them)
    state = fit(student, Step(batches, loss, ("loss",), lambda xs: sum(int(p.sum()) for _, p in xs)),
                replace(cfg, steps=steps), checkpoint, progress, stop_after, metrics, desc="sft-lora")
    nll_after = gold_nll(student, monitor, bs, pad_id, cfg) if monitor else None
    return {"method": "sft-lora", "tasks": per_task, "skipped": skipped, "examples": len(examples),
            "steps": state.step, "batch_size": bs, "history": state.history,
            "loss_tokens": state.history[-1]["tokens"] if state.history else 0,
            "trainable_parameters": trainable_parameters(student),
            "nll_before": nll_before, "nll_after": nll_after, "seconds": round(state.elapsed, 2),
            "config": asdict(cfg), "state": state}


def _train(r, metrics):
    cfg = r.cfg
    sft = run_sft_lora(r.student, r.tokenizer, None, cfg.sft.data_dir or cfg.eval.data_dir, cfg.sft,
                       r.out / "checkpoint.pt", progress=r.progress, metrics=metrics)
    return sft.pop("state"), sft


def _validate(cfg) -> None:
    from ..evaluate.tasks import get_task

    for t in cfg.sft.tasks:
        get_task(t)


METHOD = Method("sft-lora", adapters=True, synthetic=False, student=adapter_student, train=_train,
                identity=lambda cfg: {**adapter_identity(cfg), "sft": asdict(cfg.sft)}, validate=_validate)
