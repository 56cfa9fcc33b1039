"""Stage 7, export: fold a recovery adapter into the degraded weights, as a plain HF folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from peft import PeftModel

from .load import LoadConfig, load_model, load_tokenizer, save_model_dir
from .utils import RecoverLoraError


def merge(degraded: str, adapter: str | Path, out_dir: str | Path, reference: str | None = None,
          cfg: LoadConfig | None = None) -> Path:
    """degraded + adapter -> merged safetensors folder (with the reference's tokenizer)."""
    cfg = cfg or LoadConfig(dtype="float32", device="cpu")
    adapter = Path(adapter)
    if not (adapter / "adapter_config.json").exists():
        raise RecoverLoraError(f"{adapter} is not a PEFT adapter folder (no adapter_config.json)")
    ref_model = load_model(reference, cfg) if reference and Path(degraded).suffix in (".safetensors", ".bin", ".pt") else None
    model = load_model(degraded, cfg, reference=ref_model)
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    tok = load_tokenizer(reference or degraded, cfg)
    return save_model_dir(merged, out_dir, tok)


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("export", help="merge a recovery adapter into the degraded model")
    p.add_argument("--degraded", required=True, help="degraded model spec")
    p.add_argument("--adapter", required=True, help="adapter folder written by `recover`")
    p.add_argument("--out", required=True, help="output folder (safetensors)")
    p.add_argument("--reference", default=None, help="reference spec (tokenizer; config for bare state dicts)")
    p.add_argument("--allow-pickle", action="store_true")
    p.set_defaults(func=lambda a: (print(merge(a.degraded, a.adapter, a.out, a.reference,
                                              LoadConfig(dtype="float32", device="cpu",
                                                         allow_pickle=a.allow_pickle))), 0)[1])
    return p
