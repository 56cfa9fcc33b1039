"""The bench's markdown: one table row per measured path of each bench JSON, then the issue's goal checks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
