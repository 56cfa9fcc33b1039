"""``recover-lora bench``: naive vs optimized synthesis and distillation, measured in one process.

The speed benchmark beside the library (it imports the library; the library imports it only for the
``bench`` command): ``synth`` and ``distill`` (GPU paths), ``synth.bench_cpu_synth`` and ``eval``
(CPU), ``table`` (the markdown of bench JSON files).

    recover-lora bench --model smollm2 --out-file bench.json          # on the GPU
    recover-lora bench --tiny --device cpu                                  # smoke run, seconds

Synthesis (same hybrid sampling for every path, batch x seq_len tokens):
- naive: fp32 weights under bf16 autocast, Python step loop with a dynamic KV cache;
- optimized: bf16 weights, static KV cache, each decode step (forward + sampling) as a CUDA
  graph: ``compile`` (torch.compile reduce-overhead) and ``cuda_graph`` (captured by hand) are
  both measured, the faster is "optimized";
- generate: transformers' ``model.generate(do_sample=True, top_k=50, cache_implementation="static")``
  on bf16 weights, as a reference point.

Distillation (same adapter init, data order, schedule and step count for both):
- naive: fp32 weights under bf16 autocast, full [B, L, V] fp32 logits of teacher and student,
  ``naive_loss``, plain AdamW;
- optimized: :func:`recover_lora.distill.train` itself: bf16 frozen weights, fp32 LoRA
  parameters, chunked loss with closed-form gradients, fused AdamW, one teacher forward per
  step; at the naive batch and at ``distill_scale`` x that batch (with and without activation
  checkpointing; optionally torch.compile'd), and checkpointed at ``distill_max_scale`` x it.

Reported per path: tokens/s (sequence tokens, BOS included), peak CUDA memory
(``max_memory_allocated``, reset before each path, weights included), MFU and, for
distillation, held-out KL / top-1 against the fp32 reference after the run. MFU uses model
FLOPs: N = non-embedding parameters + lm_head; decode 2N + 2*l*h*L per token (attention over
L/2 on average), a training step (2N + 4*l*h*L) for the teacher + (6N + 12*l*h*L) for the
student per token (PaLM's estimate; l layers, h = heads x head_dim), divided by ``peak_tflops``.
An out-of-memory path is reported as ``"status": "oom"`` and the run goes on.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, fields
from typing import Any

import torch

from recover_lora.config import BenchConfig
from recover_lora.utils import RecoverLoraError, atomic_write_json, read_json, resolve_device

from .common import decode_flops, model_flops, train_flops
from .distill import bench_distill
from .synth import bench_cpu_synth, bench_synth, make_data
from .table import bench_table

__all__ = ["BenchConfig", "bench_table", "cmd_bench", "run_bench"]


def _tiny_model():
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=True,
                      initializer_range=0.2)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval().requires_grad_(False)


def _load(cfg: BenchConfig):
    """fp32 reference on the CPU, the start-token pool and the BOS id (None: no BOS)."""
    if cfg.tiny:
        model = _tiny_model()
        return model, torch.arange(3, model.config.vocab_size), None
    from recover_lora.load import LoadConfig, load_model, load_tokenizer, needs_bos
    from recover_lora.synth import start_token_pool

    lc = LoadConfig(dtype="float32", device="cpu")
    model = load_model(cfg.model, lc)
    tok = load_tokenizer(cfg.model, lc)
    pool = start_token_pool(tok, model.get_output_embeddings().weight.shape[0])
    bos = tok.bos_token_id if needs_bos(tok, model.config) else None
    return model, pool, bos


def run_bench(cfg: BenchConfig) -> dict[str, Any]:
    """Run the benchmark; returns (and writes to ``cfg.out_file``) one JSON-serialisable dict."""
    t_start = time.perf_counter()
    deadline = t_start + cfg.time_budget
    device = resolve_device(cfg.device)
    cfg = cfg.resolved(device)
    parts = {p.strip() for p in cfg.parts.split(",") if p.strip()}
    known = {"synth", "distill", "cpu-synth", "cpu-eval"}
    if not parts <= known:
        raise RecoverLoraError(f"unknown bench parts {sorted(parts - known)}; use {', '.join(sorted(known))}")
    import transformers

    result: dict[str, Any] = {
        "model": "tiny-llama (random)" if cfg.tiny else cfg.model, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__,
        "peak_tflops": cfg.peak_tflops, "config": asdict(cfg)}
    try:
        import peft
        result["peft"] = peft.__version__
    except ImportError:
        pass

    def save() -> None:
        result["seconds"] = round(time.perf_counter() - t_start, 2)
        if cfg.out_file:
            atomic_write_json(cfg.out_file, result)

    if "cpu-eval" in parts:  # separate processes, timed before this one loads anything
        from .eval import bench_cpu_eval

        result["cpu_eval"] = {}
        bench_cpu_eval(cfg.model, cfg.eval_data_dir, cfg.lmeval_python, cfg.eval_limit, result["cpu_eval"], save)
        if not parts - {"cpu-eval"}:
            save()
            return result
    t0 = time.perf_counter()
    ref32, pool, bos = _load(cfg)
    result["load_s"] = round(time.perf_counter() - t0, 2)
    flops = model_flops(ref32)
    result["flops"] = {**flops, "decode_flops_per_token": decode_flops(flops, cfg.synth_len),
                       "train_flops_per_token": train_flops(flops, cfg.distill_len)}
    save()

    data = None
    if "cpu-synth" in parts:
        result["cpu_synth"] = {}
        bench_cpu_synth(ref32, pool, bos, cfg, flops, result["cpu_synth"], save)
    if "synth" in parts:
        result["synth"] = {}
        data = bench_synth(ref32, pool, bos, cfg, device, flops, deadline, result["synth"], save)
    if "distill" in parts:
        if time.perf_counter() > deadline:
            result["distill"] = {"status": "skipped", "reason": "time budget spent"}
        else:
            from recover_lora.degrade import DegradeConfig, NoiseOp, degrade

            deg32 = copy.deepcopy(ref32)
            degrade(deg32, DegradeConfig(ops=[NoiseOp(rel=cfg.noise)], seed=cfg.seed))
            scale = max(cfg.distill_scale, cfg.distill_max_scale)
            need = max(cfg.distill_batch * scale * 2, 256 if device.type == "cuda" else 16)
            if data is None or data.shape[1] != cfg.distill_len or len(data) < cfg.distill_batch * scale:
                data = make_data(ref32, pool, bos, need, cfg.distill_len, cfg, device, cfg.seed)
            held = make_data(ref32, pool, bos, cfg.heldout, cfg.distill_len, cfg, device, cfg.seed + 1_000_003)
            result["distill"] = {}
            bench_distill(ref32, deg32, data.long(), held.long(), cfg, device, flops, deadline, result["distill"], save)
    save()
    return result


def cmd_bench(cmd) -> int:
    """``recover-lora bench`` (``commands.BenchCmd``: a BenchConfig plus ``table``)."""
    if cmd.table:
        print(bench_table([read_json(f) for f in cmd.table]), end="")
        return 0
    cfg = BenchConfig(**{f.name: getattr(cmd, f.name) for f in fields(BenchConfig)})
    print(json.dumps(run_bench(cfg), indent=2, default=str))
    return 0
