"""How the learning rate and the rank treat a warm start: held-out KL along the distillation of an EoRA start.

    python tools/probe_warm_lr.py qwen2.5-coder-0.5b "noise:rel=0.25" --lrs 5e-4,1.5e-4 --steps 40 --every 10
    python tools/probe_warm_lr.py smollm2 "noise:rel=0.1" --ranks 8,16,32,64,128 --steps 0   # the start alone

The reference damaged by the given ops (seed 0, as the study), LoRA of each ``--ranks`` rank (alpha
2 x rank) on every linear set by ``eora`` from W_ref - W_deg, then distilled ``--steps`` steps of
8 x 64 tokens at each learning rate (warm-up 10, bf16 autocast: the CPU study's recipe) on one
synthetic training set; the held-out KL (32 x 64 tokens) is printed every ``--every`` steps. A warm
start that training undoes shows as a curve rising above its step-0 value; ``--steps 0`` measures
the training-free start alone (what a rank can hold of the damage).
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile

from recover_lora.config import AdapterConfig, DistillConfig
from recover_lora.degrade import DegradeConfig, degrade, parse_op
from recover_lora.distill import attach_adapters, train
from recover_lora.kl import measure
from recover_lora.load import LoadConfig, load_model, load_tokenizer
from recover_lora.synth import SynthConfig, load_synthetic, synthesize


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.strip().split("\n")[0])
    p.add_argument("model")
    p.add_argument("damage", help="recover-lora degrade --damage syntax; ';' joins several ops")
    p.add_argument("--lrs", default="5e-4,1.5e-4")
    p.add_argument("--ranks", default="16")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--out", default="warm_lr.json")
    a = p.parse_args()
    lcfg = LoadConfig(dtype="float32", device="cpu")
    ref = load_model(a.model, lcfg).eval().requires_grad_(False)
    tok = load_tokenizer(a.model, lcfg)
    ids = {}
    with tempfile.TemporaryDirectory() as d:
        for name, n, seed in (("calib", 32, 2), ("heldout", 32, 1), ("train", 8 * a.steps, 3)):
            if n == 0:
                continue
            ids[name] = load_synthetic(synthesize(ref, tok, SynthConfig(num_sequences=n, seq_len=64, seed=seed),
                                                  f"{d}/{name}", progress=False))
    deg = copy.deepcopy(ref)
    degrade(deg, DegradeConfig(ops=[parse_op(s) for s in a.damage.split(";")], seed=0))
    out = {"model": a.model, "damage": a.damage, "degraded": measure(deg, ref, ids["heldout"], 8), "runs": {}}
    print(f"degraded: held-out KL {out['degraded']['kl']:.4f}", flush=True)
    for rank in (int(x) for x in a.ranks.split(",")):
        for lr in (float(x) for x in a.lrs.split(",")) if a.steps else [0.0]:
            student = attach_adapters(copy.deepcopy(deg), AdapterConfig(modules="all-linear", rank=rank, alpha=2 * rank,
                                                                        init="eora"),
                                      reference=ref, calib_ids=ids["calib"], calib_sequences=32)
            curve = [(0, measure(student, ref, ids["heldout"], 8)["kl"])]
            if a.steps:
                state = train(student, ref, ids["train"], DistillConfig(
                    steps=a.steps, batch_size=8, lr=lr, warmup_steps=10, eval_every=a.every, checkpoint_every=0,
                    autocast="bf16"), heldout_ids=ids["heldout"], progress=False)
                curve += [(e["step"], e["kl"]) for e in state.evals if e["step"] < a.steps]
                curve.append((a.steps, measure(student, ref, ids["heldout"], 8)["kl"]))  # the end, as recover measures it
            out["runs"][f"r{rank} lr {lr:g}"] = curve
            print(f"rank {rank} lr {lr:g}: " + ", ".join(f"step {s} {k:.4f}" for s, k in curve), flush=True)
            with open(a.out, "w") as f:
                json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
