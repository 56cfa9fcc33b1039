"""Stage 7, export: fold a recovery adapter into the degraded weights (a plain HF folder), or
write it as a llama.cpp LoRA adapter (GGUF) for the quantized GGUF model it repairs.

The GGUF adapter is what a damaged GGUF deployment needs: merging into the weights would mean
quantizing again (and damaging again), while llama.cpp applies a GGUF LoRA at run time on top of
the quantized weights (`llama-cli -m model.gguf --lora repair.gguf`). The format follows
llama.cpp's convert_lora_to_gguf.py: general.type "adapter", adapter.type "lora", tensors
`<base tensor>.lora_a` (rank x in) and `.lora_b` (out x rank) named as in the base GGUF.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import torch

from .load import LoadConfig, check_compatible, load_model, load_tokenizer, resolve_spec, save_model_dir
from .utils import RecoverLoraError, log, read_json


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def merge(degraded: str, adapter: str | Path, out_dir: str | Path, reference: str | None = None,
          cfg: LoadConfig | None = None, dtype: str = "float32") -> Path:
    """degraded + adapter -> merged safetensors folder (with the reference's tokenizer and a model
    card), its weights in ``dtype`` (merged in float32 first, then cast)."""
    if dtype not in DTYPES:
        raise RecoverLoraError(f"--dtype must be one of {sorted(DTYPES)}, not {dtype!r}")
    cfg = cfg or LoadConfig(dtype="float32", device="cpu")
    from .provenance import apply_adapter

    adapter = Path(adapter)
    if not (adapter / "adapter_config.json").exists():
        raise RecoverLoraError(f"{adapter} is not a PEFT adapter folder (no adapter_config.json)")
    bare = Path(degraded).suffix.lower() in (".safetensors", ".bin", ".pt")
    ref_model = load_model(reference, cfg) if reference and bare else None
    model = load_model(degraded, cfg, reference=ref_model)
    if ref_model is not None:  # the reference given for its tokenizer must pair with the model too
        check_compatible(ref_model, model)
    merged = apply_adapter(model, adapter).merge_and_unload().to(DTYPES[dtype])
    tok = load_tokenizer(reference or degraded, cfg)
    out = save_model_dir(merged, out_dir, tok)
    from .card import write_merged_card

    rep = adapter.parent / "report.json"  # recover's report, when the adapter is still in its run folder
    report = read_json(rep) if rep.exists() else {"reference": reference}
    write_merged_card(out, {**report, "command": None}, str(Path(degraded).resolve()) if Path(degraded).exists()
                      else degraded)
    return out


def _permute_rows(w: torch.Tensor, n_head: int, n_head_kv: int) -> torch.Tensor:
    """The Q/K row order llama.cpp's converter gives Llama-architecture weights (rotary halves)."""
    if n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _lora_pairs(adapter: Path) -> tuple[dict, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """adapter folder -> (its config, {module name: (A, B)}); anything but plain LoRA is refused."""
    from safetensors.torch import load_file

    cfg_path, w_path = adapter / "adapter_config.json", adapter / "adapter_model.safetensors"
    if not cfg_path.exists() or not w_path.exists():
        raise RecoverLoraError(f"{adapter} is not a PEFT adapter folder (needs adapter_config.json and "
                               "adapter_model.safetensors)")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("peft_type") != "LORA":
        raise RecoverLoraError(f"{adapter}: only LoRA adapters convert to GGUF, not {cfg.get('peft_type')}")
    for key in ("use_dora", "lora_bias"):
        if cfg.get(key):
            raise RecoverLoraError(f"{adapter}: {key} adapters have no llama.cpp equivalent")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in load_file(str(w_path)).items():
        for part in ("A", "B"):
            suffix = f".lora_{part}.weight"
            if key.endswith(suffix):
                name = key.removeprefix("base_model.model.").removesuffix(suffix)
                pairs.setdefault(name, {})[part] = t.float()
                break
        else:  # modules_to_save copies, embeddings, biases: not expressible as a llama.cpp LoRA
            raise RecoverLoraError(f"{adapter}: tensor {key} is not a LoRA A/B matrix; GGUF LoRA cannot hold it")
    broken = [n for n, ab in pairs.items() if len(ab) != 2]
    if broken:
        raise RecoverLoraError(f"{adapter}: LoRA pair incomplete for {broken[:3]}")
    return cfg, {n: (ab["A"], ab["B"]) for n, ab in pairs.items()}


def _lora_scale(cfg: dict, name: str, rank: int) -> float:
    """PEFT's scaling of one module: alpha / r (alpha / sqrt(r) with rsLoRA), per-module patterns first."""
    from peft.utils.other import get_pattern_key

    r = cfg.get("rank_pattern") or {}
    a = cfg.get("alpha_pattern") or {}
    r_m = r.get(get_pattern_key(r.keys(), name), cfg["r"])
    alpha = a.get(get_pattern_key(a.keys(), name), cfg["lora_alpha"])
    if r_m != rank:
        raise RecoverLoraError(f"{name}: adapter config says rank {r_m}, its weights have rank {rank}")
    return alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank


def export_gguf_lora(adapter: str | Path, base_gguf: str | Path, out: str | Path, dtype: str = "f32") -> Path:
    """PEFT adapter -> llama.cpp GGUF LoRA for ``base_gguf`` (the degraded GGUF model it was trained on).

    Each module's PEFT scaling is folded into lora_b and adapter.lora.alpha is written as 0, which
    llama.cpp reads as "scale 1": exact for per-module ranks (auto placement) and rsLoRA alike.
    """
    import gguf
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, Gemma2TensorProcessor, LlamaTensorProcessor

    adapter, base_gguf, out = Path(adapter), Path(resolve_spec(str(base_gguf))), Path(out)
    side = adapter / "recover_lora.json"
    if side.exists() and json.loads(side.read_text()).get("zeroed_nonfinite"):
        raise RecoverLoraError(f"{adapter} was trained on the model with its NaN/Inf weights zeroed; llama.cpp "
                               "would apply it to them as they are: export the merged model (--out-dir) instead")
    if base_gguf.suffix != ".gguf" or not base_gguf.is_file():
        raise RecoverLoraError(f"{base_gguf} is not a GGUF file; the GGUF adapter needs the GGUF model it applies to")
    if dtype not in ("f32", "f16"):
        raise RecoverLoraError(f"dtype must be f32 or f16, not {dtype!r}")
    cfg, pairs = _lora_pairs(adapter)
    reader = gguf.GGUFReader(str(base_gguf))
    arch = _gguf_field(reader, "general.architecture")
    # transformers undid exactly these row orders when it loaded the GGUF we trained on: redo them.
    proc = TENSOR_PROCESSORS.get(arch)
    if proc is not None and proc not in (LlamaTensorProcessor, Gemma2TensorProcessor):
        raise RecoverLoraError(f"GGUF architecture {arch!r} rearranges weights on conversion in ways this "
                               "exporter does not redo; supported: llama, gemma2/3, and architectures "
                               "transformers loads unchanged (qwen2, ...)")
    arch_enum = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}.get(arch)
    if arch_enum is None:
        raise RecoverLoraError(f"GGUF architecture {arch!r} is unknown to the installed gguf package")
    n_blocks = int(_gguf_field(reader, f"{arch}.block_count"))
    n_head = _gguf_field(reader, f"{arch}.attention.head_count")
    n_head_kv = _gguf_field(reader, f"{arch}.attention.head_count_kv", n_head)
    names = gguf.get_tensor_name_map(arch_enum, n_blocks)
    shapes = {t.name: tuple(int(d) for d in reversed(t.shape)) for t in reader.tensors}  # (out, in)

    logging.getLogger("gguf").setLevel(logging.WARNING)  # its writer narrates every file at INFO
    writer = gguf.GGUFWriter(str(out), arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 0.0)  # 0 = scale 1; PEFT's scaling is in lora_b
    np_dtype = np.float32 if dtype == "f32" else np.float16
    for name in sorted(pairs):
        a, b = pairs[name]
        target = names.get_name(name)
        if target is None or f"{target}.weight" not in shapes:
            raise RecoverLoraError(f"adapter module {name} has no tensor in {base_gguf.name} "
                                   f"(mapped to {target}); is this the GGUF the adapter was trained on?")
        if shapes[f"{target}.weight"] != (b.shape[0], a.shape[1]):
            raise RecoverLoraError(f"{name}: adapter is {b.shape[0]} x {a.shape[1]}, {target}.weight in "
                                   f"{base_gguf.name} is {shapes[f'{target}.weight']}")
        b = b * _lora_scale(cfg, name, a.shape[0])
        if proc is LlamaTensorProcessor and target.endswith((".attn_q", ".attn_k")):
            if not isinstance(n_head, int) or not isinstance(n_head_kv, int):
                raise RecoverLoraError(f"{arch}: per-layer head counts are not supported for Q/K adapters")
            b = _permute_rows(b, n_head, n_head if target.endswith(".attn_q") else n_head_kv)
        writer.add_tensor(f"{target}.weight.lora_a", a.numpy().astype(np_dtype))
        writer.add_tensor(f"{target}.weight.lora_b", b.contiguous().numpy().astype(np_dtype))
    out.parent.mkdir(parents=True, exist_ok=True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    log.info("wrote %s: %d LoRA pairs for %s (%s)", out, len(pairs), base_gguf.name, arch)
    return out


def run_cli(cmd) -> int:
    """``recover-lora export`` (``commands.ExportCmd``)."""
    if not cmd.out_dir and not cmd.gguf_lora:
        raise RecoverLoraError("export needs --out-dir (merged folder) and/or --gguf-lora (llama.cpp adapter)")
    if cmd.gguf_lora:
        print(export_gguf_lora(cmd.adapter, cmd.degraded, cmd.gguf_lora, cmd.gguf_dtype))
    if cmd.out_dir:
        print(merge(cmd.degraded, cmd.adapter, cmd.out_dir, cmd.reference, cmd.load, cmd.dtype))
    return 0
