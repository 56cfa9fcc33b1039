"""What the bench's parts share: device sync and memory, one measured path, FLOPs, rates, decode inputs."""

from __future__ import annotations

import gc
import time
from typing import Any, Callable

import torch

from recover_lora.budget import flop_params
from recover_lora.config import BenchConfig
from recover_lora.utils import log


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _reset_peak(device: torch.device) -> None:
    free(device)
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


def measure_path(res: dict, name: str, device: torch.device, deadline: float | None, path: Callable[[], dict],
                 save: Callable[[], None] = lambda: None) -> None:
    """``res[name] = path()`` from a fresh peak-memory count, or the path's failure (an out-of-memory
    path is reported and the bench goes on); skipped past ``deadline``. Memory is freed after it."""
    if deadline is not None and time.perf_counter() > deadline:
        res[name] = {"status": "skipped", "reason": "time budget spent"}
        return
    _reset_peak(device)
    try:
        res[name] = path()
    except Exception as e:  # noqa: BLE001
        res[name] = _failure(e, device)
    free(device)
    save()


def model_flops(model) -> dict[str, Any]:
    """N (non-embedding parameters + lm_head) and the attention width sum over layers."""
    c = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return {"params_total": sum(p.numel() for p in model.parameters()), "n_flops_params": flop_params(model),
            "layers": c.num_hidden_layers, "attn_width": c.num_attention_heads * head_dim,
            "vocab": model.get_output_embeddings().weight.shape[0]}


def decode_flops(f: dict, seq_len: int) -> float:
    return 2 * f["n_flops_params"] + 4 * f["layers"] * f["attn_width"] * seq_len / 2


def train_flops(f: dict, seq_len: int) -> float:
    n, la = f["n_flops_params"], f["layers"] * f["attn_width"] * seq_len
    return (2 * n + 4 * la) + (6 * n + 12 * la)


def rate(tokens: int, seconds: float, flops_per_token: float, cfg: BenchConfig, device: torch.device) -> dict:
    tps = tokens / seconds if seconds > 0 else float("nan")
    out = {"status": "ok", "tokens": tokens, "seconds": round(seconds, 4), "tokens_per_s": round(tps, 1)}
    if device.type == "cuda":
        out["mfu"] = round(tps * flops_per_token / (cfg.peak_tflops * 1e12), 4)
        out["peak_mem_gb"] = _peak_gb(device)
    return out


def prompts(pool: torch.Tensor, bos: int | None, n: int, length: int, top_k: int, seed: int):
    """Inputs of one decode batch, drawn like synth.generate_shard draws them."""
    g = torch.Generator().manual_seed(seed)
    prefix = pool[torch.randint(len(pool), (n,), generator=g)].unsqueeze(1)
    if bos is not None:
        prefix = torch.cat([torch.full((n, 1), bos), prefix], dim=1)
    n_greedy = torch.randint(3, 6, (n,), generator=g)
    noise = torch.rand(n, length - prefix.shape[1], top_k, generator=g)
    return prefix, n_greedy, noise
