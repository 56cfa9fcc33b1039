"""Distillation: the naive step against :func:`recover_lora.distill.train` (same adapter init, data order,
schedule and step count), at the naive batch and at larger ones."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any

import torch

from recover_lora.config import AdapterConfig, BenchConfig, DistillConfig
from recover_lora.distill import attach_adapters, train
from recover_lora.forward import decoder_of
from recover_lora.kl import measure
from recover_lora.training.loop import Step, fit
from recover_lora.training.losses import naive_loss
from recover_lora.training.state import batch_indices

from .common import free, measure_path, rate, sync, train_flops


def bench_distill(ref32, deg32, train_ids, held_ids, cfg: BenchConfig, device: torch.device, flops: dict,
                  deadline: float, res: dict, save=lambda: None) -> None:
    """Fills ``res`` path by path (``save`` is called after each)."""
    B, L, S, W = cfg.distill_batch, train_ids.shape[1], cfg.distill_steps, cfg.timing_warmup
    fpt = train_flops(flops, L)
    acfg = AdapterConfig(rank=cfg.rank)
    template = attach_adapters(copy.deepcopy(deg32), acfg, seed=cfg.seed)
    init = {n: p.detach().clone() for n, p in template.named_parameters() if p.requires_grad}
    res.update({"batch": B, "seq_len": L, "steps": S, "timed_steps": S - W, "lora_rank": cfg.rank,
                "trainable_parameters": sum(t.numel() for t in init.values()),
                "train_sequences": len(train_ids), "heldout_sequences": len(held_ids)})
    paths = _Paths(ref32, deg32, train_ids, held_ids, cfg, device, fpt, acfg, init)
    measure_path(res, "before", device, None, lambda: paths.heldout(template.to(device)))
    template = None
    measure_path(res, "naive", device, None, paths.naive, save)

    # (name, batch multiple, steps, torch.compile'd decoders, DistillConfig overrides)
    big_steps, k = max(W + 5, S // cfg.distill_scale), cfg.distill_scale
    runs = [("optimized_eager", 1, S, False, {"cuda_graph": "off"}),
            ("optimized", 1, S, False, {}),
            (f"optimized_{k}x", k, big_steps, False, {}),
            (f"optimized_{k}x_ckpt", k, big_steps, False, {"activation_checkpointing": True})]
    big = cfg.distill_max_scale
    if big > k:  # a batch this large amortises what launch overhead a step still has
        runs.append((f"optimized_{big}x_ckpt", big, max(W + 5, S // big), False, {"activation_checkpointing": True}))
    if cfg.distill_compile:
        runs.append((f"optimized_{k}x_compiled", k, big_steps, True, {"cuda_graph": "off"}))
    for name, mult, steps, compiled, extra in runs:
        measure_path(res, name, device, deadline, lambda a=(mult, steps, compiled, extra): paths.optimized(*a), save)

    nv, op = res.get("naive", {}), res.get("optimized", {})
    if nv.get("status") == "ok":
        for name in [r[0] for r in runs]:
            other = res.get(name, {})
            suffix = name[len("optimized"):]
            if other.get("status") == "ok":
                res["speedup" + suffix] = round(other["tokens_per_s"] / nv["tokens_per_s"], 2)
            if suffix.startswith(f"_{k}x") and other.get("peak_mem_gb") and nv.get("peak_mem_gb"):
                res[f"peak_mem_ratio{suffix}_vs_naive"] = round(other["peak_mem_gb"] / nv["peak_mem_gb"], 3)
        if op.get("heldout_kl") is not None and nv.get("heldout_kl") is not None:
            res["heldout_kl_diff_optimized_minus_naive"] = round(op["heldout_kl"] - nv["heldout_kl"], 5)
    save()


@dataclass
class _Paths:
    """The distillation paths, each from the same models, data and adapter init."""

    ref32: Any
    deg32: Any
    train_ids: torch.Tensor
    held_ids: torch.Tensor
    cfg: BenchConfig
    device: torch.device
    fpt: float  # training FLOPs a token
    acfg: AdapterConfig
    init: dict[str, torch.Tensor]  # the adapter's initial trainable parameters

    def heldout(self, student) -> dict:
        """Held-out KL / top-1 against the fp32 reference (chunked loss, bf16 autocast on GPU)."""
        t32 = copy.deepcopy(self.ref32).to(self.device)
        m = measure(student, t32, self.held_ids, 32, DistillConfig())
        return {"heldout_kl": round(m["kl"], 5), "heldout_top1": round(m["top1"], 5)}

    def dcfg(self, batch: int, steps: int, **extra) -> DistillConfig:
        return DistillConfig(steps=steps, batch_size=batch, lr=self.cfg.lr, warmup_steps=min(30, max(1, steps // 3)),
                             seed=self.cfg.seed, eval_every=0, checkpoint_every=0, **extra)

    def naive(self) -> dict:
        cfg, device = self.cfg, self.device
        B, L, S, W = cfg.distill_batch, self.train_ids.shape[1], cfg.distill_steps, cfg.timing_warmup
        teacher = copy.deepcopy(self.ref32).to(device)
        student = attach_adapters(copy.deepcopy(self.deg32).to(device), self.acfg, seed=cfg.seed)
        _load_trainable(student, self.init)
        # the same loop as train(), its own step; autocast "off": the step applies its own, and no
        # LoRA casts are saved; no CUDA graph
        dcfg = self.dcfg(B, S, autocast="off", cuda_graph="off")
        teacher.eval()
        h = fit(student, _naive_step(teacher, student, self.train_ids, dcfg, device), dcfg, progress=False).history
        sync(device)
        r = {**rate((S - W) * B * L, h[-1]["time"] - (h[W - 1]["time"] if W else 0.0), self.fpt, cfg, device),
             "final_loss": round(h[-1]["loss"], 5),
             "path": "fp32 weights + bf16 autocast, full fp32 [B,L,V] logits, naive_loss, AdamW "
                     f"({'fused' if device.type == 'cuda' else 'foreach'}), the one loop"}
        del teacher
        free(device)
        r.update(self.heldout(student))
        return r

    def optimized(self, mult: int, steps: int, compiled: bool, extra: dict) -> dict:
        """``train()`` at ``mult`` x the batch: bf16 frozen weights on a GPU, fp32 LoRA, chunked loss."""
        cfg, device = self.cfg, self.device
        B, L, W = cfg.distill_batch, self.train_ids.shape[1], cfg.timing_warmup
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        teacher = copy.deepcopy(self.ref32).to(device=device, dtype=dtype)
        student = attach_adapters(copy.deepcopy(self.deg32).to(device=device, dtype=dtype), self.acfg, seed=cfg.seed)
        _load_trainable(student, self.init)
        lora_dtype = str(next(p.dtype for p in student.parameters() if p.requires_grad))
        if compiled:
            decoder_of(student).compile(dynamic=False)
            decoder_of(teacher).compile(dynamic=False)
        dcfg = self.dcfg(B * mult, steps, **extra)
        t0 = time.perf_counter()
        state = train(student, teacher, self.train_ids, dcfg, progress=False)
        sync(device)
        total = time.perf_counter() - t0
        h = state.history
        # history times are taken after each step's loss sync: the difference over the timed
        # steps is their wall time (within one optimizer step's launch).
        dt = h[-1]["time"] - h[W - 1]["time"]
        r = {**rate((steps - W) * B * mult * L, dt, self.fpt, cfg, device), "steps": steps,
             "batch": B * mult, "final_loss": round(h[-1]["loss"], 5), "total_s": round(total, 2),
             "lora_dtype": lora_dtype, "chunk_tokens": dcfg.chunk_tokens or "auto",
             "step_mode": state.step_mode, "activation_checkpointing": dcfg.activation_checkpointing,
             "path": f"train(): {dtype} frozen weights, {lora_dtype} LoRA, chunked loss, "
                     f"{'fused ' if device.type == 'cuda' else ''}AdamW, step={state.step_mode}"
                     + (", activation checkpointing" if dcfg.activation_checkpointing else "")
                     + (", torch.compile'd decoders" if compiled else "")}
        del teacher
        free(device)
        r.update(self.heldout(student))
        return r


def _load_trainable(student, state: dict[str, torch.Tensor]) -> None:
    params = dict(student.named_parameters())
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t.to(params[n].device, params[n].dtype))


def _naive_step(teacher, student, train_ids: torch.Tensor, dcfg: DistillConfig, device: torch.device) -> Step:
    """The naive step the one loop runs for comparison: fp32 weights under autocast, full fp32
    [B, L, V] logits of both models, naive_loss (no chunking, no casts saved)."""
    def batches(step: int) -> list[torch.Tensor]:
        return [train_ids[batch_indices(len(train_ids), dcfg.batch_size, step, dcfg.seed)].to(device)]

    def loss(x: torch.Tensor, n: int, last: bool) -> tuple[torch.Tensor]:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            with torch.no_grad():
                t_logits = teacher(input_ids=x).logits.float()
            s_logits = student(input_ids=x).logits.float()
            value = naive_loss(s_logits, t_logits, dcfg.loss, dcfg.temperature)
        (value / n).backward()
        return (value.detach(),)

    return Step(batches, loss, ("loss",), lambda xs: sum(x.numel() for x in xs))
