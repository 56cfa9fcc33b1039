"""fp32 against bf16 autocast on a CPU, for the study's two costs: a distillation step, and scoring
benchmark items (with the answer-token KL). SmolLM2, one thread; time it with nothing else running.

    python tools/probe_cpu_bf16.py train 8                       # s/step and the held-out KL reached
    python tools/probe_cpu_bf16.py eval hellaswag,arc_easy,boolq 60 ../shared/eval-data
"""

from __future__ import annotations

import copy
import sys
import time

import torch

from recover_lora.config import AdapterConfig, DistillConfig, EvalConfig, SynthConfig
from recover_lora.degrade import DegradeConfig, NoiseOp, degrade
from recover_lora.distill import attach_adapters, train
from recover_lora.evaluate import evaluate
from recover_lora.kl import measure
from recover_lora.load import LoadConfig, load_model, load_tokenizer
from recover_lora.synth import heldout


def main(part: str, n: int, data_dir: str = "../shared/eval-data", tasks: str = "hellaswag,arc_easy,boolq") -> None:
    torch.set_num_threads(1)
    ref = load_model("smollm2", LoadConfig(device="cpu", dtype="float32"))
    tok = load_tokenizer("smollm2")
    deg = copy.deepcopy(ref)
    degrade(deg, DegradeConfig(ops=[NoiseOp(rel=0.1)], seed=0))
    if part == "train":
        ids = heldout(ref, tok, SynthConfig(seq_len=64, seed=5), 64, offset=7)
        held = heldout(ref, tok, SynthConfig(seq_len=64, seed=6), 32, offset=7)
        for ac in ("off", "bf16"):
            st = attach_adapters(copy.deepcopy(deg), AdapterConfig(modules="attn-mlp", rank=16), seed=0)
            cfg = DistillConfig(steps=n, batch_size=8, lr=5e-4, warmup_steps=2, eval_every=0, checkpoint_every=0,
                                autocast=ac)
            h = train(st, ref, ids, cfg, progress=False).history
            per = (h[-1]["time"] - h[1]["time"]) / (len(h) - 2)  # the first two steps not timed
            kl = {m: round(measure(st, ref, held, 8, DistillConfig(autocast=m))["kl"], 4) for m in ("off", "bf16")}
            print(f"train autocast={ac}: {per:.3f} s/step (8 x 64), final loss {h[-1]['loss']:.4f}, "
                  f"held-out KL measured in fp32 {kl['off']}, in bf16 {kl['bf16']}", flush=True)
        return
    out, secs = {}, {}
    for ac in ("off", "bf16"):
        ecfg = EvalConfig(tasks=tasks.split(","), data_dir=data_dir, limit=n, autocast=ac)
        t = time.perf_counter()
        out[ac] = evaluate(deg, tok, ecfg, progress=False, reference=ref)
        secs[ac] = time.perf_counter() - t
    for task, r32 in out["off"].items():
        a, b = r32["items"], out["bf16"][task]["items"]
        same = sum(x == y for x, y in zip(a["pred"], b["pred"])) / len(a["pred"])
        dll = max(max(abs(u - v) for u, v in zip(x, y)) for x, y in zip(a["loglikelihoods"], b["loglikelihoods"]))
        print(f"{task}: acc {r32['acc']:.3f} / {out['bf16'][task]['acc']:.3f}, same choice {same:.3f}, "
              f"max |dloglik| {dll:.3f}, answer-token KL {r32['answer_kl']:.4f} / {out['bf16'][task]['answer_kl']:.4f}")
    print(f"scoring (reference beside): fp32 {secs['off']:.1f} s, bf16 autocast {secs['bf16']:.1f} s, "
          f"{secs['off'] / secs['bf16']:.2f}x")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), *sys.argv[3:])
