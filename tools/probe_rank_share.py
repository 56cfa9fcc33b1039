"""How much of a damage a rank-r EoRA start can hold, per module kind: why one model's start removes less.

    python tools/probe_rank_share.py smollm2 gemma3-270m --damage "noise:rel=0.1" --ranks 16,64

For each model: the reference damaged as the study damages it (seed 0), then per linear (a) the share
of the output error E||dW x||^2 on the reference's inputs (32 x 64 synthetic tokens) that the best
rank-r fix leaves (``svd_init_``'s relative residual, squared: what ``eora`` cannot reach at rank r;
measured, as eora fits it, under the input covariance shrunk toward its diagonal by EORA_SHRINK)
and (b) how concentrated the inputs are: the share of E||x||^2 in the top r eigen-directions of the
input covariance, and its effective rank exp(entropy of the normalised eigenvalues). Means per module
kind (q, k, v, o, gate, up, down) are printed and written to ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
from collections import defaultdict

import torch

from recover_lora.config import AdapterConfig
from recover_lora.degrade import DegradeConfig, degrade, parse_op
from recover_lora.distill import attach_adapters
from recover_lora.load import LoadConfig, load_model, load_tokenizer
from recover_lora.svd_init import EORA_SHRINK, input_moments, svd_init_
from recover_lora.synth import SynthConfig, load_synthetic, synthesize


def spectrum_stats(cov: torch.Tensor, ranks: list[int]) -> dict:
    """Top-r share of the trace and the effective rank of a covariance (the shrunk one eora uses)."""
    c = (1 - EORA_SHRINK) * cov + EORA_SHRINK * torch.diag(torch.diagonal(cov))
    ev = torch.linalg.eigvalsh(c.double()).clamp_min(0).flip(0)
    p = ev / ev.sum()
    ent = -(p[p > 0] * p[p > 0].log()).sum()
    return {"dim": len(ev), "eff_rank": float(ent.exp()), **{f"top{r}": float(p[:r].sum()) for r in ranks}}


def probe(model: str, damage: str, ranks: list[int]) -> dict:
    lcfg = LoadConfig(dtype="float32", device="cpu")
    ref = load_model(model, lcfg).eval().requires_grad_(False)
    tok = load_tokenizer(model, lcfg)
    with tempfile.TemporaryDirectory() as d:
        calib = load_synthetic(synthesize(ref, tok, SynthConfig(num_sequences=32, seq_len=64, seed=2), d,
                                          progress=False))
    deg = copy.deepcopy(ref)
    degrade(deg, DegradeConfig(ops=[parse_op(s) for s in damage.split(";")], seed=0))
    per_kind: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    names = None
    for rank in ranks:
        student = attach_adapters(copy.deepcopy(deg), AdapterConfig(modules="all-linear", rank=rank, alpha=2 * rank))
        stats = svd_init_(student, ref, kind="eora", calib_ids=calib)  # what init=eora does, with its residuals
        names = list(stats)
        for n, s in stats.items():
            per_kind[n.rsplit(".", 1)[-1]][f"left_r{rank}"].append(s["rel_residual"] ** 2)
    moments = input_moments(ref, names, calib)
    for n in names:
        for k, v in spectrum_stats(moments[n], ranks).items():
            per_kind[n.rsplit(".", 1)[-1]][k].append(v)
    return {kind: {k: sum(v) / len(v) for k, v in d.items()} for kind, d in per_kind.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.strip().split("\n")[0])
    p.add_argument("models", nargs="+")
    p.add_argument("--damage", default="noise:rel=0.1")
    p.add_argument("--ranks", default="16,64")
    p.add_argument("--out", default="rank_share.json")
    a = p.parse_args()
    ranks = [int(x) for x in a.ranks.split(",")]
    out = {}
    for m in a.models:
        out[m] = probe(m, a.damage, ranks)
        print(f"{m} ({a.damage}): per module kind, the output error the rank-r eora start leaves, and the inputs'"
              " top-r share of E||x||^2 and effective rank")
        for kind, d in out[m].items():
            print(f"  {kind:10s} dim {d['dim']:5.0f}  eff. rank {d['eff_rank']:7.1f}  " + "  ".join(
                f"r{r}: left {d[f'left_r{r}']:.3f}, top-r share {d[f'top{r}']:.3f}" for r in ranks), flush=True)
        with open(a.out, "w") as f:
            json.dump({"damage": a.damage, "ranks": ranks, "models": out}, f, indent=1)


if __name__ == "__main__":
    main()
