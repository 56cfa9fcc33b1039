"""Synthesis: naive vs optimized decoding, the CPU sweep of batch x weight dtype, and the distillation data."""

from __future__ import annotations

import copy
import time
from typing import Any

import torch

from recover_lora.budget import gemm_rate
from recover_lora.config import BenchConfig
from recover_lora.synth import Decoder
from recover_lora.utils import log

from .common import decode_flops, free, measure_path, prompts, rate, sync


def bench_synth(ref32, pool, bos, cfg: BenchConfig, device: torch.device, flops: dict, deadline: float,
                res: dict, save=lambda: None) -> torch.Tensor | None:
    """Fills ``res`` path by path (``save`` is called after each); returns decoded sequences."""
    B, L, k = cfg.synth_batch, cfg.synth_len, cfg.top_k
    fpt = decode_flops(flops, L)
    inputs = prompts(pool, bos, B, L, k, cfg.seed)
    res.update({"batch": B, "seq_len": L, "top_k": k, "tokens_counted": "batch x seq_len"})
    ids: dict[str, torch.Tensor] = {}  # decoded: "naive", and "data" (the first optimized variant's)
    measure_path(res, "naive", device, None, lambda: _naive(ref32, inputs, cfg, device, fpt, ids), save)

    # optimized: bf16 weights, static cache, CUDA graphs
    variants: dict[str, Any] = {}
    res["variants"] = variants
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for mode in [m for m in cfg.synth_graphs.split(",") if m] or ["none"]:
        measure_path(variants, mode, device, deadline,
                     lambda mode=mode: _variant(ref32, dtype, inputs, mode, cfg, device, fpt, ids), save)
    ok = {m: v for m, v in variants.items() if v.get("status") == "ok"}
    if ok:
        best = max(ok, key=lambda m: ok[m]["tokens_per_s"])
        res["optimized"] = {**ok[best], "variant": best}
        # Decode steps of a small model are many tiny kernels even inside a graph: a larger batch
        # does more work per kernel. Same sampling; the batch does not change the tokens.
        if cfg.synth_scale > 1:
            measure_path(res, f"optimized_{cfg.synth_scale}x", device, deadline,
                         lambda: _big_batch(ref32, dtype, pool, bos, ok[best]["ran"], cfg, device, fpt), save)
    if cfg.generate:  # transformers' generate, bf16, static cache (it may torch.compile on its own)
        measure_path(res, "generate", device, deadline, lambda: _generate(ref32, dtype, inputs[0], cfg, device, fpt))

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
    return ids.get("data", ids.get("naive"))


def _twice(run, device: torch.device) -> tuple[float, float, Any]:
    """(warm-up seconds, timed seconds, output) of two calls of ``run``: compile / capture happen in the first."""
    t0 = time.perf_counter()
    run()
    sync(device)
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = run()
    sync(device)
    return warm, time.perf_counter() - t0, out


def _naive(ref32, inputs, cfg: BenchConfig, device: torch.device, fpt: float, ids: dict) -> dict:
    """fp32 weights, bf16 autocast, dynamic cache, eager Python loop."""
    (prefix, n_greedy, noise), B, L, k = inputs, cfg.synth_batch, cfg.synth_len, cfg.top_k
    P = prefix.shape[1]
    model = copy.deepcopy(ref32).to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        Decoder(model, B, min(L, P + 8), "dynamic").run(prefix, n_greedy, noise[:, :min(L, P + 8) - P], k, 1.0)
        sync(device)
        t0 = time.perf_counter()
        ids["naive"] = Decoder(model, B, L, "dynamic").run(prefix, n_greedy, noise, k, 1.0)
        sync(device)
        dt = time.perf_counter() - t0
    return {**rate(B * L, dt, fpt, cfg, device), "path": "fp32 weights + bf16 autocast, DynamicCache, eager"}


def _static(ref32, dtype: torch.dtype, inputs, graph: str, cfg: BenchConfig, device: torch.device):
    """(decoder, warm-up seconds, timed seconds, sequences): ``inputs`` decoded with ``dtype`` weights,
    a static cache and ``graph``, once to warm up (compile / capture happen there), once timed."""
    prefix, n_greedy, noise = inputs
    dec = Decoder(copy.deepcopy(ref32).to(device=device, dtype=dtype), len(prefix), cfg.synth_len, "static",
                  graph=graph)
    return (dec, *_twice(lambda: dec.run(prefix, n_greedy, noise, cfg.top_k, 1.0), device))


def _variant(ref32, dtype: torch.dtype, inputs, mode: str, cfg: BenchConfig, device: torch.device, fpt: float,
             ids: dict) -> dict:
    dec, warm, dt, out = _static(ref32, dtype, inputs, mode, cfg, device)
    r = {**rate(cfg.synth_batch * cfg.synth_len, dt, fpt, cfg, device), "warmup_s": round(warm, 2),
         "requested": mode, "ran": dec.mode, "path": f"{dtype} weights, static cache, graph={dec.mode}"}
    if dec.error:
        r["fallback_reason"] = dec.error
    if "naive" in ids:
        # The first generated tokens are greedy: bf16 vs fp32 should rarely disagree there.
        P = inputs[0].shape[1]
        r["greedy_token_match_vs_naive"] = round((out[:, P:P + 3] == ids["naive"][:, P:P + 3]).float().mean().item(), 4)
    ids.setdefault("data", out)
    return r


def _big_batch(ref32, dtype: torch.dtype, pool, bos, graph: str, cfg: BenchConfig, device: torch.device,
               fpt: float) -> dict:
    Bk = cfg.synth_batch * cfg.synth_scale
    dec, warm, dt, _ = _static(ref32, dtype, prompts(pool, bos, Bk, cfg.synth_len, cfg.top_k, cfg.seed + 1), graph,
                               cfg, device)
    return {**rate(Bk * cfg.synth_len, dt, fpt, cfg, device), "batch": Bk, "warmup_s": round(warm, 2),
            "ran": dec.mode, "path": f"{dtype} weights, static cache, graph={dec.mode}, batch {Bk}"}


def _generate(ref32, dtype: torch.dtype, prefix: torch.Tensor, cfg: BenchConfig, device: torch.device,
              fpt: float) -> dict:
    from transformers import GenerationConfig

    new = cfg.synth_len - prefix.shape[1]
    model = copy.deepcopy(ref32).to(device=device, dtype=dtype)
    mc = model.config
    gc_ = GenerationConfig(do_sample=True, top_k=cfg.top_k, top_p=1.0, temperature=1.0, max_new_tokens=new,
                           min_new_tokens=new, cache_implementation="static",
                           pad_token_id=mc.pad_token_id if mc.pad_token_id is not None else 0,
                           eos_token_id=mc.eos_token_id, bos_token_id=mc.bos_token_id)
    x = prefix.to(device)
    kw = dict(input_ids=x, attention_mask=torch.ones_like(x), generation_config=gc_)
    warm, dt, out = _twice(torch.inference_mode()(lambda: model.generate(**kw)), device)
    return {**rate(out.numel(), dt, fpt, cfg, device), "warmup_s": round(warm, 2),
            "path": f"model.generate, {dtype} weights, cache_implementation=static"}


def _time_decode(model, pool, bos, B: int, L: int, kind: str, cfg: BenchConfig) -> float:
    prefix, n_greedy, noise = prompts(pool, bos, B, L, cfg.top_k, cfg.seed)
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
    from recover_lora.synth import CPU_BATCH, cpu_has_bf16

    L = cfg.synth_len
    fpt = decode_flops(flops, L)
    dtypes = [torch.float32] + ([torch.bfloat16] if cpu_has_bf16() else [])
    res["threads"] = torch.get_num_threads()
    res["gemm_gflops"] = {str(d).removeprefix("torch."): round(gemm_rate(2048, 8, trials=1, dtype=d) / 1e9, 1)
                          for d in dtypes}
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
        prefix, _, _ = prompts(pool, bos, CPU_BATCH, L, cfg.top_k, cfg.seed)
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


def make_data(ref32, pool, bos, n: int, length: int, cfg: BenchConfig, device, seed: int) -> torch.Tensor:
    """Synthetic sequences for training / held-out KL (bf16 static decode on GPU)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = copy.deepcopy(ref32).to(device=device, dtype=dtype)
    prefix, n_greedy, noise = prompts(pool, bos, n, length, cfg.top_k, seed)
    bs = min(n, 1024)
    out = []
    for i in range(0, n, bs):
        dec = Decoder(model, min(bs, n - i), length, "static", graph="none")
        out.append(dec.run(prefix[i:i + bs], n_greedy[i:i + bs], noise[i:i + bs], cfg.top_k, 1.0))
    model = None
    free(device)
    return torch.cat(out)
