"""How much recovery does distilling from the teacher's top-k cost? (BENCHMARKS.md, "Teacher top-k")

    python tools/measure_teacher_topk.py 0 64 16 4 --out topk.json     # 0 = the whole vocabulary

SmolLM2-135M (fp32, CPU is fine: about 4 minutes a k on 2 cores), Gaussian noise rel. L2 0.1 on
every decoder linear, LoRA r=16 on all linears, 48 steps of 8 x 64 synthetic tokens (one pass over
384 sequences), lr 2e-3; held-out KL / top-1 on 32 x 64 other sequences, always against the whole
teacher distribution. Everything but ``teacher_topk`` is the same in every run.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time

import torch

from recover_lora.degrade import DegradeConfig, NoiseOp, degrade
from recover_lora.config import AdapterConfig, DistillConfig
from recover_lora.distill import attach_adapters, train
from recover_lora.kl import measure
from recover_lora.load import LoadConfig, load_model, load_tokenizer
from recover_lora.synth import SynthConfig, load_synthetic, synthesize


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.strip().split("\n")[0])
    ap.add_argument("k", type=int, nargs="+", help="teacher_topk values (0 = whole vocabulary)")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--out", default="topk.json")
    a = ap.parse_args()
    lc = LoadConfig(dtype="float32", device="cpu")
    ref = load_model(a.model, lc).eval().requires_grad_(False)
    tok = load_tokenizer(a.model, lc)
    deg = copy.deepcopy(ref)
    degrade(deg, DegradeConfig(ops=[NoiseOp(rel=0.1)], seed=0))
    with tempfile.TemporaryDirectory() as tmp:
        train_ids = load_synthetic(synthesize(ref, tok, SynthConfig(num_sequences=384, seq_len=64, seed=0),
                                              f"{tmp}/train", progress=False))
        held = load_synthetic(synthesize(ref, tok, SynthConfig(num_sequences=32, seq_len=64, seed=1),
                                         f"{tmp}/held", progress=False))
    out: dict = {"model": a.model, "torch": torch.__version__, "threads": torch.get_num_threads()}
    for k in a.k:
        student = attach_adapters(copy.deepcopy(deg), AdapterConfig(rank=16), seed=0)
        if "before" not in out:
            out["before"] = measure(student, ref, held, 16)
        t0 = time.time()
        train(student, ref, train_ids, DistillConfig(steps=48, batch_size=8, lr=2e-3, warmup_steps=5, eval_every=0,
                                                     checkpoint_every=0, teacher_topk=k), progress=False)
        out[f"topk={k or 'full'}"] = {**measure(student, ref, held, 16), "train_s": round(time.time() - t0, 1)}
        print(k, out[f"topk={k or 'full'}"], flush=True)
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
