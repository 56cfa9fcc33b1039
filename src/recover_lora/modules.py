"""Which modules a stage touches: the decoder layers' nn.Linear modules by preset (kv, attn, mlp,
attn-mlp, all-linear), by name or by regex, on chosen layers. Damage (degrade), adapters (attach)
and the diagnosis select modules the same way, here."""

from __future__ import annotations

import re

from torch import nn

from .config import parse_layers  # noqa: F401 - its home is the config (torch-free)
from .utils import RecoverLoraError

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
PRESETS: dict[str, tuple[str, ...] | None] = {
    "all-linear": None,  # every nn.Linear inside the decoder layers
    "attn": ATTN,
    "kv": ("k_proj", "v_proj"),
    "mlp": MLP,
    "attn-mlp": ATTN + MLP,
    "q": ("q_proj",), "k": ("k_proj",), "v": ("v_proj",), "o": ("o_proj",),
}
_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def parse_modules(text: str | list[str] | None) -> list[str] | None:
    """``"mlp"``, ``"q_proj+v_proj"``, ``"q_proj,v_proj"`` or ``"re:REGEX"`` -> list of patterns."""
    if text is None:
        return None
    if isinstance(text, (list, tuple)):
        return [str(x) for x in text]
    text = str(text).strip()
    if text.startswith("re:"):
        try:
            re.compile(text[3:])
        except re.error as e:
            raise RecoverLoraError(f"bad module regex {text!r}: {e}") from None
        return [text]
    out = [t for t in re.split(r"[,+\s]+", text) if t]
    if not out:
        raise RecoverLoraError(f"empty module list {text!r}")
    return out


def decoder_layers_prefix(model: nn.Module) -> str | None:
    """The qualified name of the decoder's layer ModuleList (e.g. ``model.layers``), if found."""
    try:
        layers = model.get_decoder().layers
    except Exception:  # noqa: BLE001 - not every model exposes a decoder with .layers
        return None
    for name, mod in model.named_modules():
        if mod is layers:
            return name
    return None


def _embedding_params(model: nn.Module) -> set[int]:
    ids: set[int] = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        try:
            mod = getattr(model, getter)()
        except Exception:  # noqa: BLE001
            mod = None
        if mod is not None and getattr(mod, "weight", None) is not None:
            ids.add(id(mod.weight))
    return ids


def _layer_of(name: str, prefix: str | None) -> int | None:
    if prefix is not None:
        if not name.startswith(prefix + "."):
            return None
        head = name[len(prefix) + 1:].split(".", 1)[0]
        return int(head) if head.isdigit() else None
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def _matches(name: str, layer: int | None, patterns: list[str]) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    for pat in patterns:
        if pat.startswith("re:"):
            if re.search(pat[3:], name):
                return True
        elif pat in PRESETS:
            if layer is None:
                continue  # presets only cover decoder layers
            names = PRESETS[pat]
            if names is None or leaf in names:
                return True
        elif name == pat or name.endswith("." + pat):
            return True
    return False


def select_modules(model: nn.Module, modules: list[str] | None = None, layers: list[int] | None = None,
                   include_embeddings: bool = False) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs whose ``weight`` a damage op touches, in model order.

    Presets (``all-linear``, ``attn``, ``kv``, ``mlp``, ``attn-mlp``) cover nn.Linear modules inside
    the decoder layers. Other patterns are name suffixes (``q_proj``, ``self_attn.q_proj``) or
    ``re:REGEX`` (searched in the full name) and may match any Linear/Embedding. The input/output
    embeddings (often tied) are skipped unless ``include_embeddings``.
    """
    modules = modules or ["all-linear"]
    for pat in modules:
        if not pat.startswith("re:") and pat not in PRESETS and not re.fullmatch(r"[\w.\-]+", pat):
            raise RecoverLoraError(f"bad module pattern {pat!r}: use a preset {sorted(PRESETS)}, a name suffix "
                                   "or re:REGEX")
    prefix = decoder_layers_prefix(model)
    emb = set() if include_embeddings else _embedding_params(model)
    want = set(layers) if layers is not None else None
    if want is not None:
        n_layers = None
        if prefix is not None:
            n_layers = len(model.get_submodule(prefix))
        if n_layers is not None:
            bad = sorted(i for i in want if i >= n_layers)
            if bad:
                raise RecoverLoraError(f"layer(s) {bad} out of range: the model has {n_layers} layers (0-{n_layers - 1})")
    out, seen = [], set()
    for name, mod in model.named_modules():
        if not isinstance(mod, (nn.Linear, nn.Embedding)):
            continue
        w = getattr(mod, "weight", None)
        if w is None or id(w) in emb or id(w) in seen:
            continue
        layer = _layer_of(name, prefix)
        if want is not None and layer not in want:
            continue
        if isinstance(mod, nn.Embedding) and all(p in PRESETS for p in modules):
            continue
        if _matches(name, layer, modules):
            seen.add(id(w))
            out.append((name, mod))
    return out
