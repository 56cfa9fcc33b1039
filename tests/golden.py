"""Fingerprints of the adapters (or full-KD weights) each method and warm start trains on a tiny
model with fixed seeds: what a redesign must leave bit for bit the same (issue 15).

    python tests/golden.py OUT.json      # from any checkout: PYTHONPATH=that/src python tests/golden.py ...

``tests/test_golden.py`` recomputes them and compares with ``tests/golden_adapters.json``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny import arc_records, tiny_model, tiny_tokenizer  # noqa: E402

CASES = {  # name -> RecoverConfig overrides (on top of COMMON)
    "default": {},
    "gaussian": {"adapter": {"init": "gaussian"}},
    "pissa": {"adapter": {"init": "pissa"}},
    "olora": {"adapter": {"init": "olora"}},
    "svd": {"adapter": {"init": "svd"}},
    "eora": {"adapter": {"init": "eora"}},
    "eora-diag": {"adapter": {"init": "eora-diag"}},
    "kv": {"adapter": {"modules": "kv"}},
    "auto": {"placement": "auto", "adapter": {"modules": "all-linear"}},  # (auto ignored modules before: the same)
    "auto+eora": {"placement": "auto", "adapter": {"init": "eora", "modules": "all-linear"}},
    "eora-only": {"adapter": {"init": "eora"}, "distill": {"steps": 0}},
    "hidden-weight": {"distill": {"hidden_weight": 10.0}},
    "full-kd": {"method": "full-kd", "full_kd": {"lr": 1e-3}},
    "sft-lora": {"method": "sft-lora", "sft": {"tasks": ["arc_easy"], "steps": 4, "batch_size": 4}},
}
COMMON = {"heldout_sequences": 4, "keep_better_start": False,  # the training itself (the check: test_recover_methods)
          "load": {"device": "cpu", "dtype": "float32"},
          "synth": {"seq_len": 12, "seed": 0}, "placement": "preset",  # recover's defaults moved; these did not
          "adapter": {"rank": 4, "alpha": 8, "modules": "attn-mlp", "init": "default"},
          "distill": {"steps": 4, "batch_size": 4, "lr": 5e-3, "warmup_steps": 1, "eval_every": 0,
                      "checkpoint_every": 100, "seed": 0}}


def _merge(a: dict, b: dict) -> dict:
    out = copy.deepcopy(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def fingerprint(folder: Path) -> str:
    """sha256 over the trained tensors (names sorted, raw float32 bytes)."""
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    h = hashlib.sha256()
    for f in files:
        sd = load_file(str(f))
        for k in sorted(sd):
            h.update(k.encode())
            h.update(sd[k].float().contiguous().numpy().tobytes())
    return h.hexdigest()


def compute() -> dict[str, str]:
    from recover_lora.degrade import DegradeConfig, NoiseOp, degrade
    from recover_lora.recover import RecoverConfig, recover

    torch.set_num_threads(1)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "eval" / "arc_easy"
        data.mkdir(parents=True)
        (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in arc_records(16)))
        tok = tiny_tokenizer()
        for name, over in CASES.items():
            ref = tiny_model("llama", initializer_range=0.2)
            deg = copy.deepcopy(ref)
            degrade(deg, DegradeConfig(ops=[NoiseOp(rel=0.3)], seed=0))
            d = _merge(COMMON, over)
            d.update(reference="tiny", degraded="tiny + noise", out_dir=str(Path(tmp) / name))
            if name == "sft-lora":
                d["sft"]["data_dir"] = str(Path(tmp) / "eval")
            recover(RecoverConfig.from_dict(d), ref, deg, tok, progress=False)
            folder = Path(tmp) / name / ("model" if over.get("method") == "full-kd" else "adapter")
            out[name] = fingerprint(folder)
    return out


if __name__ == "__main__":
    Path(sys.argv[1]).write_text(json.dumps(compute(), indent=1) + "\n")
