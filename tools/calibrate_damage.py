"""Held-out KL of a model under several damages: pick a damage strength per model for the study.

    python tools/calibrate_damage.py qwen2.5-coder-0.5b "noise:rel=0.1" "noise:rel=0.2" \
        "noise:rel=0.2,modules=kv" "rtn:bits=3,group=128,modules=mlp" [--sequences 16 --seq-len 64]

Each damage is applied to a fresh copy of the reference (seed 0, as ``study.yaml``'s damage_seed)
and measured on the same synthetic held-out sequences the reference generates (hybrid sampling).
Prints one markdown row per damage: KL(reference || damaged) per token and top-1 agreement.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time

import torch

from recover_lora.degrade import DegradeConfig, degrade, parse_op
from recover_lora.kl import measure
from recover_lora.load import LoadConfig, load_model, load_tokenizer
from recover_lora.synth import SynthConfig, load_synthetic, synthesize


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.strip().split("\n")[0])
    p.add_argument("model")
    p.add_argument("damages", nargs="+", help="recover-lora degrade --damage syntax; ';' joins several ops")
    p.add_argument("--sequences", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="damage seed")
    a = p.parse_args()
    lcfg = LoadConfig(dtype="float32")
    ref = load_model(a.model, lcfg)
    tok = load_tokenizer(a.model, lcfg)
    with tempfile.TemporaryDirectory() as d:
        synthesize(ref, tok, SynthConfig(num_sequences=a.sequences, seq_len=a.seq_len, seed=1, batch_size=a.sequences),
                   d, progress=False)
        ids = load_synthetic(d)
    print(f"{a.model}: {len(ids)} x {ids.shape[1]} held-out tokens")
    print("| damage | held-out KL | top-1 agreement | seconds |\n|---|---:|---:|---:|")
    for spec in a.damages:
        t0 = time.perf_counter()
        deg = copy.deepcopy(ref)
        degrade(deg, DegradeConfig(ops=[parse_op(s) for s in spec.split(";")], seed=a.seed))
        with torch.no_grad():
            m = measure(deg, ref, ids, batch_size=8)
        print(f"| `{spec}` | {m['kl']:.4f} | {100 * m['top1']:.1f}% | {time.perf_counter() - t0:.0f} |", flush=True)
        deg = None


if __name__ == "__main__":
    main()
