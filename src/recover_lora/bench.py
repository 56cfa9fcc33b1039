"""``recover-lora bench``: naive vs optimized synthesis and distillation, measured in one process.

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
import gc
import json
import sys
import time
from pathlib import Path
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

from .config import AdapterConfig, DistillConfig
from .distill import attach_adapters, train
from .kl import measure
from .train.losses import naive_loss
from .train.state import batch_indices, lr_lambda
from .synth import Decoder
from .utils import RecoverLoraError, atomic_write_json, log, resolve_device
from .config import H100_BF16_DENSE_TFLOPS, BenchConfig  # noqa: F401 - re-exported


# --------------------------------------------------------------------------------------- helpers
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _reset_peak(device: torch.device) -> None:
    _free(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gb(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if device.type == "cuda" else None


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def _failure(e: BaseException, device: torch.device) -> dict[str, Any]:
    status = "oom" if _is_oom(e) else "error"
    log.warning("bench path failed (%s): %s", status, e)
    out = {"status": status, "error": f"{type(e).__name__}: {str(e)[:400]}"}
    if device.type == "cuda":
        out["peak_mem_gb"] = _peak_gb(device)
    return out


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
    from .load import LoadConfig, load_model, load_tokenizer, needs_bos
    from .synth import start_token_pool

    lc = LoadConfig(dtype="float32", device="cpu")
    model = load_model(cfg.model, lc)
    tok = load_tokenizer(cfg.model, lc)
    pool = start_token_pool(tok, model.get_output_embeddings().weight.shape[0])
    bos = tok.bos_token_id if needs_bos(tok, model.config) else None
    return model, pool, bos


def model_flops(model) -> dict[str, Any]:
    """N (non-embedding parameters + lm_head) and the attention width sum over layers."""
    total = sum(p.numel() for p in model.parameters())
    emb = model.get_input_embeddings().weight.numel()
    head = model.get_output_embeddings().weight.numel()
    c = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return {"params_total": total, "n_flops_params": total - emb + head, "layers": c.num_hidden_layers,
            "attn_width": c.num_attention_heads * head_dim, "vocab": model.get_output_embeddings().weight.shape[0]}


def _decode_flops(f: dict, seq_len: int) -> float:
    return 2 * f["n_flops_params"] + 4 * f["layers"] * f["attn_width"] * seq_len / 2


def _train_flops(f: dict, seq_len: int) -> float:
    n, la = f["n_flops_params"], f["layers"] * f["attn_width"] * seq_len
    return (2 * n + 4 * la) + (6 * n + 12 * la)


def _rate(tokens: int, seconds: float, flops_per_token: float, cfg: BenchConfig, device: torch.device) -> dict:
    tps = tokens / seconds if seconds > 0 else float("nan")
    out = {"status": "ok", "tokens": tokens, "seconds": round(seconds, 4), "tokens_per_s": round(tps, 1)}
    if device.type == "cuda":
        out["mfu"] = round(tps * flops_per_token / (cfg.peak_tflops * 1e12), 4)
        out["peak_mem_gb"] = _peak_gb(device)
    return out


def _prompts(pool: torch.Tensor, bos: int | None, n: int, length: int, top_k: int, seed: int):
    """Inputs of one decode batch, drawn like synth.generate_shard draws them."""
    g = torch.Generator().manual_seed(seed)
    prefix = pool[torch.randint(len(pool), (n,), generator=g)].unsqueeze(1)
    if bos is not None:
        prefix = torch.cat([torch.full((n, 1), bos), prefix], dim=1)
    n_greedy = torch.randint(3, 6, (n,), generator=g)
    noise = torch.rand(n, length - prefix.shape[1], top_k, generator=g)
    return prefix, n_greedy, noise


# ------------------------------------------------------------------------------------ synthesis
def bench_synth(ref32, pool, bos, cfg: BenchConfig, device: torch.device, flops: dict, deadline: float,
                res: dict, save=lambda: None) -> torch.Tensor | None:
    """Fills ``res`` path by path (``save`` is called after each); returns decoded sequences."""
    B, L, k = cfg.synth_batch, cfg.synth_len, cfg.top_k
    fpt = _decode_flops(flops, L)
    prefix, n_greedy, noise = _prompts(pool, bos, B, L, k, cfg.seed)
    P = prefix.shape[1]
    res.update({"batch": B, "seq_len": L, "top_k": k, "tokens_counted": "batch x seq_len"})
    naive_ids = None
    data = None

    # naive: fp32 weights, bf16 autocast, dynamic cache, eager Python loop
    _reset_peak(device)
    try:
        model = copy.deepcopy(ref32).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            Decoder(model, B, min(L, P + 8), "dynamic").run(prefix, n_greedy, noise[:, :min(L, P + 8) - P], k, 1.0)
            _sync(device)
            t0 = time.perf_counter()
            naive_ids = Decoder(model, B, L, "dynamic").run(prefix, n_greedy, noise, k, 1.0)
            _sync(device)
            dt = time.perf_counter() - t0
        res["naive"] = {**_rate(B * L, dt, fpt, cfg, device), "path": "fp32 weights + bf16 autocast, DynamicCache, eager"}
    except Exception as e:  # noqa: BLE001
        res["naive"] = _failure(e, device)
    model = None
    _free(device)
    save()

    # optimized: bf16 weights, static cache, CUDA graphs
    variants: dict[str, Any] = {}
    res["variants"] = variants
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for mode in [m for m in cfg.synth_graphs.split(",") if m] or ["none"]:
        if time.perf_counter() > deadline:
            variants[mode] = {"status": "skipped", "reason": "time budget spent"}
            continue
        _reset_peak(device)
        try:
            model = copy.deepcopy(ref32).to(device=device, dtype=dtype)
            dec = Decoder(model, B, L, "static", graph=mode)
            t0 = time.perf_counter()
            dec.run(prefix, n_greedy, noise, k, 1.0)  # warm-up: compile / capture happens here
            _sync(device)
            warm = time.perf_counter() - t0
            t0 = time.perf_counter()
            ids = dec.run(prefix, n_greedy, noise, k, 1.0)
            _sync(device)
            dt = time.perf_counter() - t0
            r = {**_rate(B * L, dt, fpt, cfg, device), "warmup_s": round(warm, 2), "requested": mode,
                 "ran": dec.mode, "path": f"{dtype} weights, static cache, graph={dec.mode}"}
            if dec.error:
                r["fallback_reason"] = dec.error
            if naive_ids is not None:
                # The first generated tokens are greedy: bf16 vs fp32 should rarely disagree there.
                r["greedy_token_match_vs_naive"] = round(
                    (ids[:, P:P + 3] == naive_ids[:, P:P + 3]).float().mean().item(), 4)
            variants[mode] = r
            data = ids if data is None else data
        except Exception as e:  # noqa: BLE001
            variants[mode] = _failure(e, device)
        dec = model = None
        _free(device)
        save()
    ok = {m: v for m, v in variants.items() if v.get("status") == "ok"}
    if ok:
        best = max(ok, key=lambda m: ok[m]["tokens_per_s"])
        res["optimized"] = {**ok[best], "variant": best}
        # Decode steps of a small model are many tiny kernels even inside a graph: a larger batch
        # does more work per kernel. Same sampling; the batch does not change the tokens.
        big = f"optimized_{cfg.synth_scale}x"
        if cfg.synth_scale > 1 and time.perf_counter() > deadline:
            res[big] = {"status": "skipped", "reason": "time budget spent"}
        elif cfg.synth_scale > 1:
            _reset_peak(device)
            try:
                Bk = B * cfg.synth_scale
                pk, gk, nk = _prompts(pool, bos, Bk, L, k, cfg.seed + 1)
                model = copy.deepcopy(ref32).to(device=device, dtype=dtype)
                dec = Decoder(model, Bk, L, "static", graph=ok[best]["ran"])
                t0 = time.perf_counter()
                dec.run(pk, gk, nk, k, 1.0)
                _sync(device)
                warm = time.perf_counter() - t0
                t0 = time.perf_counter()
                dec.run(pk, gk, nk, k, 1.0)
                _sync(device)
                dt = time.perf_counter() - t0
                res[big] = {**_rate(Bk * L, dt, fpt, cfg, device), "batch": Bk, "warmup_s": round(warm, 2),
                            "ran": dec.mode, "path": f"{dtype} weights, static cache, graph={dec.mode}, batch {Bk}"}
            except Exception as e:  # noqa: BLE001
                res[big] = _failure(e, device)
            dec = model = None
            _free(device)
            save()

    # transformers' generate, bf16, static cache (it may torch.compile on its own)
    if cfg.generate and time.perf_counter() > deadline:
        res["generate"] = {"status": "skipped", "reason": "time budget spent"}
    elif cfg.generate:
        _reset_peak(device)
        try:
            from transformers import GenerationConfig

            model = copy.deepcopy(ref32).to(device=device, dtype=dtype)
            mc = model.config
            gc_ = GenerationConfig(do_sample=True, top_k=k, top_p=1.0, temperature=1.0, max_new_tokens=L - P,
                                   min_new_tokens=L - P, cache_implementation="static",
                                   pad_token_id=mc.pad_token_id if mc.pad_token_id is not None else 0,
                                   eos_token_id=mc.eos_token_id, bos_token_id=mc.bos_token_id)
            x = prefix.to(device)
            kw = dict(input_ids=x, attention_mask=torch.ones_like(x), generation_config=gc_)
            t0 = time.perf_counter()
            with torch.inference_mode():
                model.generate(**kw)
            _sync(device)
            warm = time.perf_counter() - t0
            t0 = time.perf_counter()
            with torch.inference_mode():
                out = model.generate(**kw)
            _sync(device)
            dt = time.perf_counter() - t0
            res["generate"] = {**_rate(out.numel(), dt, fpt, cfg, device), "warmup_s": round(warm, 2),
                               "path": f"model.generate, {dtype} weights, cache_implementation=static"}
        except Exception as e:  # noqa: BLE001
            res["generate"] = _failure(e, device)
        model = None
        _free(device)

    base = res.get("naive", {}).get("tokens_per_s")
    gen = res.get("generate", {}).get("tokens_per_s")
    for name in ("optimized", f"optimized_{cfg.synth_scale}x"):
        tps = res.get(name, {}).get("tokens_per_s")
        suffix = name[len("optimized"):]
        if tps and base:
            res[f"speedup{suffix}_vs_naive"] = round(tps / base, 2)
        if tps and gen:
            res[f"speedup{suffix}_vs_generate"] = round(tps / gen, 2)
    save()
    return data if data is not None else naive_ids


# ---------------------------------------------------------------------------- CPU synthesis sweep
def gemm_rate(dtype: torch.dtype, n: int = 2048, reps: int = 8) -> float:
    """Dense matmul FLOP/s of this machine at ``dtype`` (the decode limit's yardstick)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return reps * 2 * n ** 3 / (time.perf_counter() - t0)


def _time_decode(model, pool, bos, B: int, L: int, kind: str, cfg: BenchConfig) -> float:
    prefix, n_greedy, noise = _prompts(pool, bos, B, L, cfg.top_k, cfg.seed)
    P = prefix.shape[1]
    with torch.inference_mode():
        Decoder(model, B, P + 4, kind).run(prefix, n_greedy, noise[:, :4], cfg.top_k, 1.0)  # warm-up
        t0 = time.perf_counter()
        Decoder(model, B, L, kind).run(prefix, n_greedy, noise, cfg.top_k, 1.0)
        return time.perf_counter() - t0


def bench_cpu_synth(ref32, pool, bos, cfg: BenchConfig, flops: dict, res: dict, save=lambda: None) -> None:
    """Synthesis on a CPU: the decode limit (2N FLOP/token at the measured fp32 gemm rate), the
    old default (fp32, dynamic cache, batch 16), a sweep of batch x weight dtype with the static
    cache, and transformers' generate at the new default, all in one run."""
    from .synth import CPU_BATCH, cpu_has_bf16

    L = cfg.synth_len
    fpt = _decode_flops(flops, L)
    dtypes = [torch.float32] + ([torch.bfloat16] if cpu_has_bf16() else [])
    res["threads"] = torch.get_num_threads()
    res["gemm_gflops"] = {str(d).removeprefix("torch."): round(gemm_rate(d) / 1e9, 1) for d in dtypes}
    res["decode_limit_tokens_per_s"] = round(res["gemm_gflops"]["float32"] * 1e9 / fpt, 1)
    res["seq_len"], res["decode_flops_per_token"] = L, fpt
    save()

    def entry(name: str, model, B: int, kind: str) -> None:
        dt = _time_decode(model, pool, bos, B, L, kind, cfg)
        tps = B * L / dt
        res["runs"][name] = {"batch": B, "cache": kind, "dtype": str(next(model.parameters()).dtype),
                             "tokens_per_s": round(tps, 1),
                             "share_of_limit": round(tps / res["decode_limit_tokens_per_s"], 3)}
        log.info("cpu synth %s: %.0f tokens/s", name, tps)
        save()

    res["runs"] = {}
    entry("old default (fp32, dynamic, batch 16)", ref32, 16, "dynamic")
    batches = [int(b) for b in cfg.cpu_batches.split(",") if b]
    for d in dtypes:
        model = ref32 if d == torch.float32 else copy.deepcopy(ref32).to(d)
        for B in batches:
            entry(f"{str(d).removeprefix('torch.')}, static, batch {B}", model, B, "static")
    default = f"{str(dtypes[-1]).removeprefix('torch.')}, static, batch {CPU_BATCH}"
    if default in res["runs"]:
        res["default"] = default
    if cfg.generate:  # transformers' generate, same weights, batch and sampling settings
        from transformers import GenerationConfig

        model = copy.deepcopy(ref32).to(dtypes[-1])
        prefix, _, _ = _prompts(pool, bos, CPU_BATCH, L, cfg.top_k, cfg.seed)
        mc = model.config
        gc_ = GenerationConfig(do_sample=True, top_k=cfg.top_k, top_p=1.0, temperature=1.0,
                               max_new_tokens=L - prefix.shape[1], min_new_tokens=L - prefix.shape[1],
                               cache_implementation="static", eos_token_id=mc.eos_token_id,
                               pad_token_id=mc.pad_token_id if mc.pad_token_id is not None else 0)
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = model.generate(input_ids=prefix, attention_mask=torch.ones_like(prefix), generation_config=gc_)
            dt = time.perf_counter() - t0
        res["runs"]["transformers generate"] = {"batch": CPU_BATCH, "cache": "static",
                                                "dtype": str(dtypes[-1]), "tokens_per_s": round(out.numel() / dt, 1),
                                                "share_of_limit": round(out.numel() / dt / res["decode_limit_tokens_per_s"], 3)}
        save()
    runs = res["runs"]
    if "default" in res:
        best = runs[res["default"]]["tokens_per_s"]
        res["default_vs_old_default"] = round(best / runs["old default (fp32, dynamic, batch 16)"]["tokens_per_s"], 2)
        if "transformers generate" in runs:
            res["default_vs_generate"] = round(best / runs["transformers generate"]["tokens_per_s"], 2)


# --------------------------------------------------------------------------------- distillation
def _load_trainable(student, state: dict[str, torch.Tensor]) -> None:
    params = dict(student.named_parameters())
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t.to(params[n].device, params[n].dtype))


def _naive_train(teacher, student, train_ids, dcfg: DistillConfig, device, warm: int) -> tuple[float, list[float]]:
    """fp32 weights under autocast, full fp32 logits, naive_loss, plain AdamW. Returns timed seconds."""
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=dcfg.lr, weight_decay=dcfg.weight_decay, betas=(0.9, 0.999))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(dcfg))
    student.train()
    losses = []
    t0 = time.perf_counter()
    for step in range(dcfg.steps):
        if step == warm:
            _sync(device)
            t0 = time.perf_counter()
        x = train_ids[batch_indices(len(train_ids), dcfg.batch_size, step, dcfg.seed)].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            with torch.no_grad():
                t_logits = teacher(input_ids=x).logits.float()
            s_logits = student(input_ids=x).logits.float()
            loss = naive_loss(s_logits, t_logits, dcfg.loss, dcfg.temperature)
        loss.backward()
        del s_logits, t_logits
        if dcfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, dcfg.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    _sync(device)
    return time.perf_counter() - t0, [float(v) for v in losses]


def bench_distill(ref32, deg32, train_ids, held_ids, cfg: BenchConfig, device: torch.device, flops: dict,
                  deadline: float, res: dict, save=lambda: None) -> None:
    """Fills ``res`` path by path (``save`` is called after each)."""
    B, L, S, W = cfg.distill_batch, train_ids.shape[1], cfg.distill_steps, cfg.timing_warmup
    fpt = _train_flops(flops, L)
    acfg = AdapterConfig(rank=cfg.rank)
    template = attach_adapters(copy.deepcopy(deg32), acfg, seed=cfg.seed)
    init = {n: p.detach().clone() for n, p in template.named_parameters() if p.requires_grad}
    res.update({"batch": B, "seq_len": L, "steps": S, "timed_steps": S - W, "lora_rank": cfg.rank,
                "trainable_parameters": sum(t.numel() for t in init.values()),
                "train_sequences": len(train_ids), "heldout_sequences": len(held_ids)})
    mcfg = DistillConfig()  # measure: chunked loss, bf16 autocast on GPU, fp32 reference as teacher

    def heldout(student) -> dict:
        t32 = copy.deepcopy(ref32).to(device)
        m = measure(student, t32, held_ids, 32, mcfg)
        return {"heldout_kl": round(m["kl"], 5), "heldout_top1": round(m["top1"], 5)}

    try:
        _reset_peak(device)
        res["before"] = heldout(template.to(device))
    except Exception as e:  # noqa: BLE001
        res["before"] = _failure(e, device)
    template = None
    _free(device)

    def dcfg_for(batch: int, steps: int, **extra) -> DistillConfig:
        return DistillConfig(steps=steps, batch_size=batch, lr=cfg.lr, warmup_steps=min(30, max(1, steps // 3)),
                             seed=cfg.seed, eval_every=0, checkpoint_every=0, **extra)

    # naive
    _reset_peak(device)
    try:
        teacher = copy.deepcopy(ref32).to(device)
        student = attach_adapters(copy.deepcopy(deg32).to(device), acfg, seed=cfg.seed)
        _load_trainable(student, init)
        dt, losses = _naive_train(teacher, student, train_ids, dcfg_for(B, S), device, W)
        r = {**_rate((S - W) * B * L, dt, fpt, cfg, device), "final_loss": round(losses[-1], 5),
             "path": "fp32 weights + bf16 autocast, full fp32 [B,L,V] logits, naive_loss, AdamW (foreach)"}
        teacher = None
        _free(device)
        r.update(heldout(student))
        res["naive"] = r
    except Exception as e:  # noqa: BLE001
        res["naive"] = _failure(e, device)
    teacher = student = None
    _free(device)
    save()

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
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for name, mult, steps, compiled, extra in runs:
        if time.perf_counter() > deadline:
            res[name] = {"status": "skipped", "reason": "time budget spent"}
            continue
        _reset_peak(device)
        try:
            teacher = copy.deepcopy(ref32).to(device=device, dtype=dtype)
            student = attach_adapters(copy.deepcopy(deg32).to(device=device, dtype=dtype), acfg, seed=cfg.seed)
            _load_trainable(student, init)
            lora_dtype = str(next(p.dtype for p in student.parameters() if p.requires_grad))
            if compiled:
                from .forward import decoder_of
                decoder_of(student).compile(dynamic=False)
                decoder_of(teacher).compile(dynamic=False)
            dcfg = dcfg_for(B * mult, steps, **extra)
            t0 = time.perf_counter()
            state = train(student, teacher, train_ids, dcfg, progress=False)
            _sync(device)
            total = time.perf_counter() - t0
            h = state.history
            # history times are taken after each step's loss sync: the difference over the timed
            # steps is their wall time (within one optimizer step's launch).
            dt = h[-1]["time"] - h[W - 1]["time"]
            r = {**_rate((steps - W) * B * mult * L, dt, fpt, cfg, device), "steps": steps,
                 "batch": B * mult, "final_loss": round(h[-1]["loss"], 5), "total_s": round(total, 2),
                 "lora_dtype": lora_dtype, "chunk_tokens": dcfg.chunk_tokens or "auto",
                 "step_mode": state.step_mode, "activation_checkpointing": dcfg.activation_checkpointing,
                 "path": f"train(): {dtype} frozen weights, {lora_dtype} LoRA, chunked loss, "
                         f"{'fused ' if device.type == 'cuda' else ''}AdamW, step={state.step_mode}"
                         + (", activation checkpointing" if dcfg.activation_checkpointing else "")
                         + (", torch.compile'd decoders" if compiled else "")}
            teacher = None
            _free(device)
            r.update(heldout(student))
            res[name] = r
        except Exception as e:  # noqa: BLE001
            res[name] = _failure(e, device)
        teacher = student = None
        _free(device)
        save()

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


# ---------------------------------------------------------------------------------------- main
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
        from .bench_eval import bench_cpu_eval

        result["cpu_eval"] = {}
        bench_cpu_eval(cfg.model, cfg.eval_data_dir, cfg.lmeval_python, cfg.eval_limit, result["cpu_eval"], save)
        if not parts - {"cpu-eval"}:
            save()
            return result
    t0 = time.perf_counter()
    ref32, pool, bos = _load(cfg)
    result["load_s"] = round(time.perf_counter() - t0, 2)
    flops = model_flops(ref32)
    result["flops"] = {**flops, "decode_flops_per_token": _decode_flops(flops, cfg.synth_len),
                       "train_flops_per_token": _train_flops(flops, cfg.distill_len)}
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
            from .degrade import DegradeConfig, NoiseOp, degrade

            deg32 = copy.deepcopy(ref32)
            degrade(deg32, DegradeConfig(ops=[NoiseOp(rel=cfg.noise)], seed=cfg.seed))
            scale = max(cfg.distill_scale, cfg.distill_max_scale)
            need = max(cfg.distill_batch * scale * 2, 256 if device.type == "cuda" else 16)
            if data is None or data.shape[1] != cfg.distill_len or len(data) < cfg.distill_batch * scale:
                data = _make_data(ref32, pool, bos, need, cfg.distill_len, cfg, device, cfg.seed)
            held = _make_data(ref32, pool, bos, cfg.heldout, cfg.distill_len, cfg, device, cfg.seed + 1_000_003)
            result["distill"] = {}
            bench_distill(ref32, deg32, data.long(), held.long(), cfg, device, flops, deadline, result["distill"], save)
    save()
    return result


def _make_data(ref32, pool, bos, n: int, length: int, cfg: BenchConfig, device, seed: int) -> torch.Tensor:
    """Synthetic sequences for training / held-out KL (bf16 static decode on GPU)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = copy.deepcopy(ref32).to(device=device, dtype=dtype)
    prefix, n_greedy, noise = _prompts(pool, bos, n, length, cfg.top_k, seed)
    bs = min(n, 1024)
    out = []
    for i in range(0, n, bs):
        dec = Decoder(model, min(bs, n - i), length, "static", graph="none")
        out.append(dec.run(prefix[i:i + bs], n_greedy[i:i + bs], noise[i:i + bs], cfg.top_k, 1.0))
    model = None
    _free(device)
    return torch.cat(out)


# ---------------------------------------------------------------------------------------- table
_SYNTH_ROWS = (("naive", "naive (fp32 + autocast, DynamicCache, eager)"),
               ("generate", "`generate` (bf16, static cache)"),
               ("optimized", "optimized ({variant})"),
               ("optimized_{k}x", "optimized ({variant}), {k}x the batch"))
_DISTILL_ROWS = (("naive", "naive (fp32 + autocast, full fp32 logits)"),
                 ("optimized_eager", "optimized `train()`, eager step"),
                 ("optimized", "optimized `train()`, {mode}"),
                 ("optimized_{k}x", "optimized `train()`, {mode}"),
                 ("optimized_{k}x_ckpt", "optimized `train()`, {mode}, activation checkpointing"),
                 ("optimized_{m}x_ckpt", "optimized `train()`, {mode}, activation checkpointing"),
                 ("optimized_{k}x_compiled", "optimized `train()`, torch.compile'd decoders"))


def _fmt(v, spec: str) -> str:
    return "" if v is None else format(v, spec)


def bench_table(results: list[dict[str, Any]], kl_tol: float = 0.01) -> str:
    """Markdown: one table row per measured path of each bench JSON, then the issue's goal checks."""
    lines = ["| model | part | path | batch | tokens/s | x naive | peak GB | MFU | held-out KL (top-1) |",
             "|---|---|---|---|---:|---:|---:|---:|---|"]
    checks = []
    for r in results:
        model = Path(str(r.get("model", "?"))).name
        syn, dis = r.get("synth") or {}, r.get("distill") or {}
        ks, kd = (r.get("config") or {}).get("synth_scale", 4), (r.get("config") or {}).get("distill_scale", 4)
        km = (r.get("config") or {}).get("distill_max_scale", 0)
        base = (syn.get("naive") or {}).get("tokens_per_s")
        for key, label in _SYNTH_ROWS:
            key = key.format(k=ks)
            row = syn.get(key) if key != "optimized" else syn.get("optimized")
            if not row or row.get("status") != "ok":
                continue
            tps = row["tokens_per_s"]
            lines.append(f"| {model} | synth | {label.format(variant=row.get('variant', row.get('ran', '')), k=ks)} | "
                         f"{row.get('batch', syn.get('batch'))} x {syn.get('seq_len')} | {tps:,.0f} | "
                         f"{_fmt(tps / base if base else None, '.1f')} | {_fmt(row.get('peak_mem_gb'), '.2f')} | "
                         f"{_fmt(100 * row['mfu'] if 'mfu' in row else None, '.1f')}{'%' if 'mfu' in row else ''} | |")
        dbase = (dis.get("naive") or {}).get("tokens_per_s")
        seen: set[str] = set()
        for key, label in _DISTILL_ROWS:
            key = key.format(k=kd, m=km)
            if key in seen:  # distill_max_scale == distill_scale
                continue
            seen.add(key)
            row = dis.get(key)
            if not row or row.get("status") != "ok":
                if row and row.get("status") in ("oom", "error"):
                    lines.append(f"| {model} | distill | {key}: {row['status']} | | | | "
                                 f"{_fmt(row.get('peak_mem_gb'), '.2f')} | | |")
                continue
            tps = row["tokens_per_s"]
            kl = (f"{row['heldout_kl']:.4f} ({100 * row['heldout_top1']:.1f}%) after {row.get('steps', dis.get('steps'))}"
                  f" steps" if row.get("heldout_kl") is not None else "")
            lines.append(f"| {model} | distill | {label.format(mode=row.get('step_mode', 'eager').split(' (')[0])} | "
                         f"{row.get('batch', dis.get('batch'))} x {dis.get('seq_len')} | {tps:,.0f} | "
                         f"{_fmt(tps / dbase if dbase else None, '.1f')} | {_fmt(row.get('peak_mem_gb'), '.2f')} | "
                         f"{_fmt(100 * row['mfu'] if 'mfu' in row else None, '.1f')}{'%' if 'mfu' in row else ''} | {kl} |")
        # the goals of issue 4
        best_syn = max([syn.get(f"speedup{sfx}_vs_naive") or 0 for sfx in ("", f"_{ks}x")])
        best_gen = max([syn.get(f"speedup{sfx}_vs_generate") or 0 for sfx in ("", f"_{ks}x")])
        if base:
            checks.append((model, "synthesis >= 10x naive", best_syn >= 10, f"{best_syn:.1f}x"))
        if syn.get("generate", {}).get("tokens_per_s"):
            checks.append((model, "synthesis ~4x generate", best_gen >= 4, f"{best_gen:.1f}x"))
        if dbase:
            sp = max([v for k2, v in dis.items() if k2.startswith("speedup") and isinstance(v, (int, float))] or [0])
            checks.append((model, "distillation >= 8x naive", sp >= 8, f"{sp:.1f}x"))
            nmem = dis["naive"].get("peak_mem_gb")
            mems = {k2: dis[k2]["peak_mem_gb"] for k2 in (f"optimized_{kd}x", f"optimized_{kd}x_ckpt")
                    if (dis.get(k2) or {}).get("peak_mem_gb")}
            if nmem and mems:
                k2 = min(mems, key=mems.get)
                checks.append((model, f"peak memory at {kd}x batch <= naive's", mems[k2] <= nmem,
                               f"{mems[k2]:.2f} vs {nmem:.2f} GB ({k2})"))
            d = dis.get("heldout_kl_diff_optimized_minus_naive")
            if d is not None:
                checks.append((model, "same held-out KL as naive", abs(d) <= kl_tol, f"diff {d:+.4f}"))
        opt = dis.get("optimized") or {}
        if "gemma" in model.lower() and opt.get("peak_mem_gb"):
            checks.append((model, f"distills {dis.get('batch')} x {dis.get('seq_len')} within 20 GB",
                           opt["peak_mem_gb"] <= 20, f"{opt['peak_mem_gb']:.2f} GB"))
    if checks:
        lines += ["", "| model | goal | met | measured |", "|---|---|---|---|"]
        lines += [f"| {m} | {g} | {'yes' if ok else '**no**'} | {v} |" for m, g, ok, v in checks]
    return "\n".join(lines) + "\n"


def cmd_bench(cmd) -> int:
    """``recover-lora bench`` (``commands.BenchCmd``: a BenchConfig plus ``table``)."""
    if cmd.table:
        from .utils import read_json

        print(bench_table([read_json(f) for f in cmd.table]), end="")
        return 0
    cfg = BenchConfig(**{f.name: getattr(cmd, f.name) for f in fields(BenchConfig)})
    print(json.dumps(run_bench(cfg), indent=2, default=str))
    return 0
