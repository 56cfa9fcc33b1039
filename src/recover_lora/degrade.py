"""Stage 2, degrade: seeded, reproducible weight damage for experiments and tests.

A :class:`DegradeConfig` is a list of damage ops applied in order plus a seed and default targets.
Ops (each a typed dataclass):

- :class:`NoiseOp`  Gaussian noise scaled so that ||dW|| / ||W|| equals ``rel`` on every module;
- :class:`RtnOp`    round-to-nearest int-k quantization, per-group scales along the input dim;
- :class:`DtypeOp`  round trip through fp16 (clamped to +-65504), bf16, or fp8 e4m3 (clamped to +-448,
  optional per-tensor scale);
- :class:`BitflipOp` flip exactly N distinct random bits (or ``rate`` x eligible bits) of the
  stored values, optionally only sign / exponent / mantissa bits;
- :class:`PruneOp`  magnitude pruning to a sparsity per tensor, or an N:M pattern (e.g. 2:4);
- :class:`GgufOp`   llama.cpp's own block quantization (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) and back, by
  gguf-py's port of ggml's reference quantizers: what ``llama-quantize`` writes without an imatrix.

Ops touch only the ``weight`` of the chosen modules (never biases or norms). Randomness comes from
CPU ``torch.Generator`` objects seeded from a stable hash of (seed, op index, module name), so the
same seed and config give bit-identical weights whatever the device.

Compact spec strings (CLI ``--damage``), several joined with ``;`` or given as repeated flags::

    noise:rel=0.1
    rtn:bits=3,group=128,modules=mlp        (add ``asym`` for asymmetric)
    dtype:fp8,scale=tensor                   (fp16 | bf16 | fp8 | fp8_e5m2)
    bitflip:n=10,bits=exponent               (or rate=1e-6; bits=all|sign|exponent|mantissa)
    prune:sparsity=0.5    prune:nm=2:4
    gguf:Q4_0                                (Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0)
    ...,modules=q_proj+v_proj,layers=0-5,10  (per-op targets; ``re:REGEX`` for a regex)
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from .config import parse_layers
from .modules import parse_modules, select_modules
from .utils import RecoverLoraError, atomic_write_json, log

RECORD_FORMAT = "recover-lora/damage-record"
RECORD_VERSION = 1

# ----------------------------------------------------------------------------------------------
# Ops
# ----------------------------------------------------------------------------------------------


@dataclass
class DamageOp:
    """Base of all ops: per-op targets (``None`` = the config's defaults)."""

    kind: ClassVar[str] = ""
    modules: list[str] | None = None
    layers: list[int] | None = None

    def validate(self) -> None:
        pass

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **asdict(self)}

    def describe(self) -> str:
        parts = [f"{f.name}={getattr(self, f.name)}" for f in fields(self)
                 if f.name not in ("modules", "layers") and getattr(self, f.name) is not None]
        return f"{self.kind}({', '.join(parts)})"


@dataclass
class NoiseOp(DamageOp):
    kind: ClassVar[str] = "noise"
    rel: float = 0.1  # target ||dW|| / ||W|| per module

    def validate(self) -> None:
        if not (math.isfinite(self.rel) and self.rel >= 0):
            raise RecoverLoraError(f"noise rel must be a finite number >= 0, got {self.rel}")


@dataclass
class RtnOp(DamageOp):
    kind: ClassVar[str] = "rtn"
    bits: int = 4
    group: int = 128  # along the input dim; <= 0 means one group per row
    symmetric: bool = True

    def validate(self) -> None:
        if not 2 <= self.bits <= 8:
            raise RecoverLoraError(f"rtn bits must be in 2..8, got {self.bits}")


DTYPE_FORMATS = {"fp16": "fp16", "float16": "fp16", "half": "fp16", "bf16": "bf16", "bfloat16": "bf16",
                 "fp8": "fp8", "fp8_e4m3": "fp8", "e4m3": "fp8", "fp8_e5m2": "fp8_e5m2", "e5m2": "fp8_e5m2"}
FP16_MAX = 65504.0
FP8_E4M3_MAX = 448.0
FP8_E5M2_MAX = 57344.0


@dataclass
class DtypeOp(DamageOp):
    kind: ClassVar[str] = "dtype"
    format: str = "fp16"  # fp16 | bf16 | fp8 (e4m3fn) | fp8_e5m2
    per_tensor_scale: bool = False  # fp8 only: scale so amax maps to the format's max

    def validate(self) -> None:
        if self.format not in DTYPE_FORMATS:
            raise RecoverLoraError(f"unknown dtype format {self.format!r}; use one of fp16, bf16, fp8, fp8_e5m2")
        self.format = DTYPE_FORMATS[self.format]
        if self.per_tensor_scale and not self.format.startswith("fp8"):
            raise RecoverLoraError("dtype scale=tensor applies only to fp8")


BIT_FIELDS = ("all", "sign", "exponent", "mantissa")


@dataclass
class BitflipOp(DamageOp):
    kind: ClassVar[str] = "bitflip"
    n: int | None = None  # exactly this many distinct bits over all targeted tensors
    rate: float | None = None  # or round(rate * eligible bits)
    bits: str = "all"  # all | sign | exponent | mantissa

    def validate(self) -> None:
        if (self.n is None) == (self.rate is None):
            raise RecoverLoraError("bitflip needs exactly one of n= or rate=")
        if self.n is not None and self.n < 0:
            raise RecoverLoraError(f"bitflip n must be >= 0, got {self.n}")
        if self.rate is not None and not 0 <= self.rate <= 1:
            raise RecoverLoraError(f"bitflip rate must be in [0, 1], got {self.rate}")
        if self.bits not in BIT_FIELDS:
            raise RecoverLoraError(f"bitflip bits must be one of {BIT_FIELDS}, got {self.bits!r}")


@dataclass
class PruneOp(DamageOp):
    kind: ClassVar[str] = "prune"
    sparsity: float | None = None  # fraction of each tensor zeroed (smallest |w|)
    nm: list[int] | None = None  # [N, M]: keep the N largest |w| in every M consecutive inputs

    def validate(self) -> None:
        if (self.sparsity is None) == (self.nm is None):
            raise RecoverLoraError("prune needs exactly one of sparsity= or nm=N:M")
        if self.sparsity is not None and not 0 <= self.sparsity <= 1:
            raise RecoverLoraError(f"prune sparsity must be in [0, 1], got {self.sparsity}")
        if self.nm is not None:
            self.nm = [int(x) for x in self.nm]
            if len(self.nm) != 2 or not 0 <= self.nm[0] <= self.nm[1] or self.nm[1] < 1:
                raise RecoverLoraError(f"prune nm must be N:M with 0 <= N <= M, got {self.nm}")


# llama.cpp block formats gguf-py can write (its numpy port of ggml's reference quantizers, what
# `llama-quantize` does without an importance matrix); the K-quants need llama.cpp itself.
GGUF_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")


@dataclass
class GgufOp(DamageOp):
    kind: ClassVar[str] = "gguf"
    type: str = "Q4_0"

    def validate(self) -> None:
        t = str(self.type).upper()
        if t not in GGUF_TYPES:
            raise RecoverLoraError(f"gguf type must be one of {', '.join(GGUF_TYPES)}, got {self.type!r} "
                                   "(K-quants: requantize with llama.cpp's llama-quantize and load the .gguf)")
        self.type = t


OP_TYPES: dict[str, type[DamageOp]] = {c.kind: c for c in (NoiseOp, RtnOp, DtypeOp, BitflipOp, PruneOp, GgufOp)}


def op_from_dict(d: dict[str, Any]) -> DamageOp:
    d = dict(d)
    kind = d.pop("kind", None)
    if kind not in OP_TYPES:
        raise RecoverLoraError(f"unknown damage kind {kind!r}; use one of {sorted(OP_TYPES)}")
    cls = OP_TYPES[kind]
    names = {f.name for f in fields(cls)}
    extra = sorted(set(d) - names)
    if extra:
        raise RecoverLoraError(f"unknown field(s) {extra} for damage kind {kind!r}")
    op = cls(**d)
    op.validate()
    return op


@dataclass
class DegradeConfig:
    """Ops applied in order, the seed, and default targets for ops that name none."""

    ops: list[DamageOp] = field(default_factory=list)
    seed: int = 0
    modules: list[str] = field(default_factory=lambda: ["all-linear"])
    layers: list[int] | None = None
    include_embeddings: bool = False  # embeddings / lm_head (often tied) are spared by default

    def to_dict(self) -> dict[str, Any]:
        return {"ops": [op.to_dict() for op in self.ops], "seed": self.seed, "modules": list(self.modules),
                "layers": self.layers, "include_embeddings": self.include_embeddings}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DegradeConfig:
        return cls(ops=[op_from_dict(o) for o in d.get("ops", [])], seed=int(d.get("seed", 0)),
                   modules=list(d.get("modules") or ["all-linear"]), layers=d.get("layers"),
                   include_embeddings=bool(d.get("include_embeddings", False)))


# ----------------------------------------------------------------------------------------------
# Spec parser
# ----------------------------------------------------------------------------------------------

_LIST_KEYS = ("modules", "layers")
_KEY_ALIASES = {
    "noise": {"rel": "rel", "l2": "rel", "rel_l2": "rel"},
    "rtn": {"bits": "bits", "k": "bits", "group": "group", "group_size": "group", "gs": "group", "sym": "symmetric",
            "symmetric": "symmetric"},
    "dtype": {"format": "format", "fmt": "format", "to": "format", "scale": "per_tensor_scale"},
    "bitflip": {"n": "n", "rate": "rate", "bits": "bits", "field": "bits"},
    "prune": {"sparsity": "sparsity", "s": "sparsity", "nm": "nm"},
    "gguf": {"type": "type", "q": "type", "format": "type"},
}


def _bool(tok: str, value: str) -> bool:
    v = value.lower()
    if v in ("1", "true", "yes", "on", "sym", "symmetric", "tensor"):
        return True
    if v in ("0", "false", "no", "off", "asym", "none"):
        return False
    raise RecoverLoraError(f"bad boolean in damage token {tok!r}")


def _number(tok: str, value: str, typ: type) -> Any:
    try:
        x = float(value) if typ is float else int(value)
    except ValueError:
        raise RecoverLoraError(f"bad {typ.__name__} in damage token {tok!r}") from None
    return x


def _value(kind: str, name: str, tok: str, value: str) -> Any:
    """The typed value of one ``key=value`` damage token (``name``: the op field the key names)."""
    if name in ("rel", "rate", "sparsity"):
        return _number(tok, value, float)
    if name in ("bits", "group", "n") and not (kind == "bitflip" and name == "bits"):
        return _number(tok, value, int)
    if name in ("symmetric", "per_tensor_scale"):
        return _bool(tok, value)
    if name == "nm":
        m = re.fullmatch(r"(\d+)[:/](\d+)", value)
        if not m:
            raise RecoverLoraError(f"bad N:M in damage token {tok!r}: use e.g. nm=2:4")
        return [int(m.group(1)), int(m.group(2))]
    if name == "format":
        if value.lower() not in DTYPE_FORMATS:
            raise RecoverLoraError(f"unknown dtype format in damage token {tok!r}; use fp16, bf16, fp8, fp8_e5m2")
        return value.lower()
    if name == "type":
        return value.upper()
    if name == "bits":  # bitflip field
        value = {"exp": "exponent", "man": "mantissa", "mant": "mantissa"}.get(value.lower(), value.lower())
        if value not in BIT_FIELDS:
            raise RecoverLoraError(f"bad bit field in damage token {tok!r}; use one of {BIT_FIELDS}")
        return value.lower()
    raise RecoverLoraError(f"unhandled damage token {tok!r}")  # pragma: no cover - every alias is handled above


def parse_op(spec: str) -> DamageOp:
    """Parse one op, e.g. ``rtn:bits=3,group=128,modules=mlp``; errors name the bad token."""
    spec = spec.strip()
    kind, _, rest = spec.partition(":")
    kind = kind.strip().lower()
    if kind not in OP_TYPES:
        raise RecoverLoraError(f"unknown damage kind {kind!r} in {spec!r}; use one of {sorted(OP_TYPES)}")
    aliases = _KEY_ALIASES[kind]
    kw: dict[str, Any] = {}
    raw: dict[str, tuple[str, str]] = {}  # key -> (token, value) for list keys accumulating commas
    last_list_key = None
    for tok in [t.strip() for t in rest.split(",")] if rest.strip() else []:
        if not tok:
            raise RecoverLoraError(f"empty token in damage spec {spec!r}")
        if "=" not in tok:
            low = tok.lower()
            if kind == "dtype" and low in DTYPE_FORMATS and "format" not in kw:
                kw["format"] = low
            elif kind == "gguf" and "type" not in kw and last_list_key is None:
                kw["type"] = tok.upper()
            elif kind == "rtn" and low in ("sym", "asym", "symmetric", "asymmetric"):
                kw["symmetric"] = low.startswith("sym")
            elif kind == "dtype" and last_list_key is None and "format" not in kw:
                raise RecoverLoraError(f"unknown dtype format in damage token {tok!r}; use fp16, bf16, fp8, fp8_e5m2")
            elif last_list_key is not None:
                t0, v0 = raw[last_list_key]
                raw[last_list_key] = (f"{t0},{tok}", f"{v0},{tok}")
            else:
                raise RecoverLoraError(f"bad token {tok!r} in damage spec {spec!r}: expected key=value")
            continue
        key, _, value = tok.partition("=")
        key, value = key.strip().lower(), value.strip()
        if not value:
            raise RecoverLoraError(f"empty value in damage token {tok!r}")
        if key in _LIST_KEYS:
            raw[key] = (tok, value)
            last_list_key = key
            continue
        last_list_key = None
        if key not in aliases:
            raise RecoverLoraError(f"unknown key {key!r} in damage token {tok!r} for {kind}; "
                                   f"known: {sorted(set(aliases) | set(_LIST_KEYS))}")
        kw[aliases[key]] = _value(kind, aliases[key], tok, value)
    for key, parse in (("modules", parse_modules), ("layers", parse_layers)):
        if key in raw:
            try:
                kw[key] = parse(raw[key][1])
            except RecoverLoraError as e:
                raise RecoverLoraError(f"bad damage token {raw[key][0]!r}: {e}") from None
    if kind == "noise" and "rel" not in kw:
        raise RecoverLoraError(f"damage spec {spec!r}: noise needs rel=, e.g. noise:rel=0.1")
    if kind == "dtype" and "format" not in kw:
        raise RecoverLoraError(f"damage spec {spec!r}: dtype needs a format, e.g. dtype:fp16")
    op = OP_TYPES[kind](**kw)
    try:
        op.validate()
    except RecoverLoraError as e:
        raise RecoverLoraError(f"damage spec {spec!r}: {e}") from None
    return op


def parse_damage(specs: str | list[str]) -> list[DamageOp]:
    """Parse one or more specs; within a string, ops are separated by ``;``."""
    if isinstance(specs, str):
        specs = [specs]
    ops = []
    for s in specs:
        for part in s.split(";"):
            if part.strip():
                ops.append(parse_op(part))
    if not ops:
        raise RecoverLoraError("no damage ops given")
    return ops


# ----------------------------------------------------------------------------------------------
# Kernels (all in place on a weight tensor; computed in fp32/fp64 and cast back)
# ----------------------------------------------------------------------------------------------


def stable_seed(*parts: Any) -> int:
    """A 63-bit seed from a stable hash (not Python's salted hash())."""
    h = hashlib.blake2b("\x1f".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def _generator(seed: int, op_index: int, name: str) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(stable_seed(seed, op_index, name))
    return g


def _apply_noise(w: torch.Tensor, op: NoiseOp, gen: torch.Generator) -> None:
    noise = torch.randn(w.shape, generator=gen, dtype=torch.float32)  # on CPU: device independent
    # Norms are reduced on the CPU so that the scale (and so the weights) match on every device.
    wn = _norm(w.detach().float().cpu())
    nn_ = _norm(noise)
    if not math.isfinite(wn):
        raise RecoverLoraError("noise: the weight holds non-finite values, so a relative L2 target is undefined")
    scale = op.rel * wn / nn_ if nn_ > 0 else 0.0
    noise.mul_(scale)
    if w.dtype == torch.float32:
        w.add_(noise.to(w.device))
    else:
        w.copy_((w.float() + noise.to(w.device)).to(w.dtype))


def _rtn_groups(x: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    """Fake-quantize rows of ``x`` (shape [..., g]) group-wise along the last dim."""
    # Divisors are tensors on x's device: CUDA turns division by a Python scalar into a multiply by
    # its reciprocal, which would make GPU results differ from CPU ones in the last bit.
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        amax = x.abs().amax(dim=-1, keepdim=True)
        scale = torch.where(amax > 0, amax / _t(qmax, x), torch.ones_like(amax))
        return torch.clamp(torch.round(x / scale), -qmax - 1, qmax) * scale
    qmax = 2 ** bits - 1
    lo = x.amin(dim=-1, keepdim=True)
    hi = x.amax(dim=-1, keepdim=True)
    scale = torch.where(hi > lo, (hi - lo) / _t(qmax, x), torch.ones_like(hi))
    zero = torch.round(-lo / scale)
    q = torch.clamp(torch.round(x / scale) + zero, 0, qmax)
    return (q - zero) * scale


def _t(v: float, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(v, dtype=like.dtype, device=like.device)


def _apply_rtn(w: torch.Tensor, op: RtnOp) -> None:
    x = w.float().reshape(w.shape[0], -1) if w.dim() > 1 else w.float().reshape(1, -1)
    cols = x.shape[1]
    g = op.group if 0 < op.group < cols else cols
    out = torch.empty_like(x)
    main = (cols // g) * g
    if main:
        out[:, :main] = _rtn_groups(x[:, :main].reshape(x.shape[0], -1, g), op.bits, op.symmetric).reshape(x.shape[0], main)
    if main < cols:  # a short last group
        out[:, main:] = _rtn_groups(x[:, main:], op.bits, op.symmetric)
    w.copy_(out.reshape(w.shape).to(w.dtype))


def _apply_gguf(w: torch.Tensor, op: GgufOp, name: str) -> None:
    """Quantize to a llama.cpp block format and back, row by row along the input dimension (the
    layout GGUF stores a linear weight in)."""
    import numpy as np
    from gguf import GGMLQuantizationType, quants
    from gguf.constants import GGML_QUANT_SIZES

    qtype = GGMLQuantizationType[op.type]
    block = GGML_QUANT_SIZES[qtype][0]
    if w.dim() != 2 or w.shape[1] % block:
        raise RecoverLoraError(f"gguf:{op.type} quantizes blocks of {block} inputs; {name} has shape "
                               f"{tuple(w.shape)} (llama.cpp would fall back to another type for it)")
    x = w.detach().float().cpu().numpy().astype(np.float32)
    out = quants.dequantize(quants.quantize(x, qtype), qtype).reshape(x.shape)
    w.copy_(torch.from_numpy(np.ascontiguousarray(out)).to(device=w.device, dtype=w.dtype))


def _apply_dtype(w: torch.Tensor, op: DtypeOp) -> None:
    x = w.float()
    if op.format == "fp16":
        y = x.clamp(-FP16_MAX, FP16_MAX).to(torch.float16)
    elif op.format == "bf16":
        y = x.to(torch.bfloat16)
    else:
        fmt, fmax = ((torch.float8_e4m3fn, FP8_E4M3_MAX) if op.format == "fp8"
                     else (torch.float8_e5m2, FP8_E5M2_MAX))
        scale = 1.0
        if op.per_tensor_scale:
            amax = x[torch.isfinite(x)].abs().max().item() if x.numel() else 0.0
            scale = amax / fmax if amax > 0 else 1.0
        if scale == 1.0:
            y = x.clamp(-fmax, fmax).to(fmt)
        else:
            st = _t(scale, x)
            y = (x / st).clamp(-fmax, fmax).to(fmt).float() * st
    w.copy_(y.to(w.dtype))


_INT_VIEW = {torch.float32: (torch.int32, 32, 8, 23), torch.float16: (torch.int16, 16, 5, 10),
             torch.bfloat16: (torch.int16, 16, 8, 7), torch.float64: (torch.int64, 64, 11, 52)}


def _field_bits(dtype: torch.dtype, which: str) -> list[int]:
    if dtype not in _INT_VIEW:
        raise RecoverLoraError(f"bitflip does not support weights stored as {dtype}")
    _, width, exp, man = _INT_VIEW[dtype]
    if which == "sign":
        return [width - 1]
    if which == "exponent":
        return list(range(man, man + exp))
    if which == "mantissa":
        return list(range(man))
    return list(range(width))


def _sample_distinct(total: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` distinct positions in [0, total), in draw order (deterministic for a generator)."""
    if n > total:
        raise RecoverLoraError(f"bitflip asks for {n} flips but the targets hold only {total} eligible bits")
    if n == 0:
        return torch.empty(0, dtype=torch.int64)
    if 4 * n >= total:
        return torch.randperm(total, generator=gen)[:n]
    picked = torch.empty(0, dtype=torch.int64)
    while picked.numel() < n:
        cand = torch.cat([picked, torch.randint(0, total, (int(1.1 * (n - picked.numel())) + 16,),
                                                generator=gen, dtype=torch.int64)])
        uniq, inv = torch.unique(cand, return_inverse=True)
        first = torch.full((uniq.numel(),), cand.numel(), dtype=torch.int64)
        first.scatter_reduce_(0, inv, torch.arange(cand.numel()), reduce="amin")
        picked = cand[first.sort().values][:n]
    return picked


def _apply_bitflips(w: torch.Tensor, positions: torch.Tensor, bit_list: list[int]) -> None:
    """Flip bits at eligible-bit ``positions`` (element = pos // len(bit_list), bit = bit_list[pos % len])."""
    if positions.numel() == 0:
        return
    int_dtype, width, _, _ = _INT_VIEW[w.dtype]
    nb = len(bit_list)
    elem = positions // nb
    bit = torch.tensor(bit_list, dtype=torch.int64)[positions % nb]
    mask = torch.ones_like(bit) << bit  # unsigned value of each single-bit mask
    uniq, inv = torch.unique(elem, return_inverse=True)
    combined = torch.zeros(uniq.numel(), dtype=torch.int64).index_add_(0, inv, mask)  # distinct bits: sum == OR
    if width < 64:
        combined = torch.where(combined >= (1 << (width - 1)), combined - (1 << width), combined)
    flat = w.view(-1).view(int_dtype)
    idx = uniq.to(w.device)
    flat[idx] = flat[idx] ^ combined.to(int_dtype).to(w.device)


def _apply_prune(w: torch.Tensor, op: PruneOp) -> None:
    x = w.detach().float().reshape(w.shape[0], -1) if w.dim() > 1 else w.detach().float().reshape(1, -1)
    if op.nm is not None:
        n, m = op.nm
        cols = x.shape[1]
        if cols % m:
            raise RecoverLoraError(f"prune nm={n}:{m} needs the input dim ({cols}) to be a multiple of {m}")
        grp = x.abs().reshape(x.shape[0], cols // m, m)
        # Zero the (m - n) smallest |w| in each group of m consecutive inputs (ties: lower index first).
        drop = torch.topk(grp, m - n, dim=-1, largest=False, sorted=True).indices
        keep = torch.ones_like(grp, dtype=torch.bool).scatter_(-1, drop, False)
        w.mul_(keep.reshape(w.shape).to(w.device).to(w.dtype))
        return
    k = int(round(op.sparsity * x.numel()))
    if k <= 0:
        return
    idx = torch.topk(x.abs().reshape(-1), k, largest=False, sorted=False).indices
    w.view(-1)[idx.to(w.device)] = 0


# ----------------------------------------------------------------------------------------------
# degrade()
# ----------------------------------------------------------------------------------------------


def _f(x: float) -> float | None:
    """JSON-safe float: non-finite values become null."""
    return float(x) if math.isfinite(x) else None


def _norm(x: torch.Tensor) -> float:
    """L2 norm as a Python float; fp32 reduction (fast), fp64 only when fp32 overflows."""
    n = torch.linalg.vector_norm(x).item()
    if not math.isfinite(n) and bool(torch.isfinite(x).all()):
        n = torch.linalg.vector_norm(x, dtype=torch.float64).item()
    return n


def _measure(before: torch.Tensor, after: torch.Tensor, before_norm: float | None = None) -> dict[str, Any]:
    b = before.detach().float()
    d = after.detach().float() - b
    dn = _norm(d)
    bn = _norm(b) if before_norm is None else before_norm
    out: dict[str, Any] = {"numel": before.numel(), "w_sq": bn * bn}
    if math.isfinite(dn):
        out.update(rel_l2=dn / bn if bn > 0 else (0.0 if dn == 0 else None),
                   max_abs=torch.linalg.vector_norm(d, ord=math.inf).item() if d.numel() else 0.0, dw_sq=dn * dn)
    else:  # e.g. an exponent bit flip made a weight inf/nan
        out.update(rel_l2=None, max_abs=None, dw_sq=0.0, nonfinite=int((~torch.isfinite(d)).sum().item()))
    return out


@dataclass
class DamageRecord:
    """What was done and the measured damage; ``to_dict()`` is what goes into ``damage.json``."""

    config: dict[str, Any]
    seed: int
    model: dict[str, Any]
    ops: list[dict[str, Any]]
    modules: dict[str, dict[str, Any]]
    totals: dict[str, Any]
    elapsed_s: float = 0.0
    format: str = RECORD_FORMAT
    version: int = RECORD_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.format, "version": self.version, "seed": self.seed, "config": self.config,
                "model": self.model, "totals": self.totals, "ops": self.ops, "modules": self.modules,
                "elapsed_s": self.elapsed_s}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DamageRecord:
        return cls(config=d["config"], seed=d["seed"], model=d.get("model", {}), ops=d.get("ops", []),
                   modules=d.get("modules", {}), totals=d.get("totals", {}), elapsed_s=d.get("elapsed_s", 0.0),
                   format=d.get("format", RECORD_FORMAT), version=d.get("version", RECORD_VERSION))

    def summary(self) -> str:
        return summarize(self)


def _totals(entries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    dw = sum(e.get("_dw_sq", 0.0) for e in entries.values())
    ws = sum(e.get("_w_sq", 0.0) for e in entries.values())
    rels = [e["rel_l2"] for e in entries.values() if e.get("rel_l2") is not None]
    maxes = [e["max_abs"] for e in entries.values() if e.get("max_abs") is not None]
    out = {"n_modules": len(entries), "n_params": sum(e["numel"] for e in entries.values()),
           "rel_l2": _f(math.sqrt(dw / ws)) if ws > 0 else None,
           "mean_module_rel_l2": sum(rels) / len(rels) if rels else None,
           "max_module_rel_l2": max(rels) if rels else None,
           "max_abs": max(maxes) if maxes else None}
    nonfinite = sum(e.get("nonfinite", 0) for e in entries.values())
    if nonfinite:
        out["nonfinite"] = nonfinite
        out["rel_l2"] = None
    if any("flips" in e for e in entries.values()):
        out["flips"] = sum(e.get("flips", 0) for e in entries.values())
    if any("sparsity" in e for e in entries.values()):
        zeros = sum(e["sparsity"] * e["numel"] for e in entries.values() if "sparsity" in e)
        out["sparsity"] = zeros / max(1, sum(e["numel"] for e in entries.values() if "sparsity" in e))
    return out


def _public(e: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in e.items() if not k.startswith("_")}


def _targets(model: nn.Module, cfg: DegradeConfig) -> list[dict[str, nn.Module]]:
    """Every op's target modules, resolved up front (an op that matches nothing is refused)."""
    targets: list[dict[str, nn.Module]] = []
    for i, op in enumerate(cfg.ops):
        mods = parse_modules(op.modules if op.modules is not None else cfg.modules)
        layers = parse_layers(op.layers if op.layers is not None else cfg.layers)
        sel = select_modules(model, mods, layers, cfg.include_embeddings)
        if not sel:
            raise RecoverLoraError(f"damage op {i} ({op.kind}, modules={mods}, layers={layers}) matches no module")
        targets.append(dict(sel))
    return targets


def _flip_plan(op: "BitflipOp", targets: dict[str, nn.Module], order: list[str], seed: int,
               i: int) -> dict[str, tuple[torch.Tensor, list[int]]]:
    """Bit flips planned over all of an op's targets at once: N distinct eligible bits overall."""
    names = [n for n in order if n in targets]
    sizes, bit_lists = [], []
    for n in names:
        w = targets[n].weight
        bl = _field_bits(w.dtype, op.bits)
        bit_lists.append(bl)
        sizes.append(w.numel() * len(bl))
    total = sum(sizes)
    count = op.n if op.n is not None else int(round(op.rate * total))
    g = torch.Generator(device="cpu")
    g.manual_seed(stable_seed(seed, i, "bitflip"))
    pos = _sample_distinct(total, count, g).sort().values
    offsets = torch.tensor([0] + sizes).cumsum(0)
    plan = {}
    for j, n in enumerate(names):
        lo, hi = torch.searchsorted(pos, offsets[j]).item(), torch.searchsorted(pos, offsets[j + 1]).item()
        plan[n] = (pos[lo:hi] - offsets[j], bit_lists[j])
    return plan


def _apply(op, w: torch.Tensor, name: str, gen: torch.Generator | None, flips) -> dict[str, Any]:
    """Apply one op to the weight ``w`` in place; returns what the op records beside the measures."""
    if isinstance(op, NoiseOp):
        _apply_noise(w, op, gen)
    elif isinstance(op, RtnOp):
        _apply_rtn(w, op)
    elif isinstance(op, DtypeOp):
        _apply_dtype(w, op)
    elif isinstance(op, BitflipOp):
        _apply_bitflips(w, *flips)
        return {"flips": int(flips[0].numel())}
    elif isinstance(op, PruneOp):
        _apply_prune(w, op)
    elif isinstance(op, GgufOp):
        _apply_gguf(w, op, name)
        return {"sparsity": (w == 0).sum().item() / max(1, w.numel())}
    return {}


@torch.no_grad()
def degrade(model: nn.Module, cfg: DegradeConfig) -> DamageRecord:
    """Damage ``model`` in place as ``cfg`` says and return the measured :class:`DamageRecord`."""
    t0 = time.perf_counter()
    if not cfg.ops:
        raise RecoverLoraError("DegradeConfig has no ops")
    for op in cfg.ops:
        op.validate()
    seed = int(cfg.seed)
    targets = _targets(model, cfg)
    order = [name for name, _ in model.named_modules() if any(name in t for t in targets)]
    module_of = {name: mod for t in targets for name, mod in t.items()}
    flip_plan = {i: _flip_plan(op, targets[i], order, seed, i) for i, op in enumerate(cfg.ops) if isinstance(op, BitflipOp)}

    op_entries: list[dict[str, dict[str, Any]]] = [{} for _ in cfg.ops]
    final: dict[str, dict[str, Any]] = {}
    for name in order:
        w = module_of[name].weight.data
        orig = w.clone()
        orig_norm = _norm(orig.float())
        applied = []
        for i, op in enumerate(cfg.ops):
            if name not in targets[i]:
                continue
            before = w.clone() if applied else orig
            extra = _apply(op, w, name, _generator(seed, i, name) if isinstance(op, NoiseOp) else None,
                           flip_plan[i][name] if isinstance(op, BitflipOp) else None)
            m = _measure(before, w, orig_norm if before is orig else None)
            op_entries[i][name] = {"rel_l2": m["rel_l2"], "max_abs": m["max_abs"], "numel": m["numel"], **extra,
                                   **({"nonfinite": m["nonfinite"]} if "nonfinite" in m else {}),
                                   "_dw_sq": m["dw_sq"], "_w_sq": m["w_sq"]}
            applied.append(i)
            last = m
            if before is not orig:
                del before
        m = _measure(orig, w, orig_norm) if len(applied) > 1 else last
        entry = {"rel_l2": m["rel_l2"], "max_abs": m["max_abs"], "numel": m["numel"], "ops": applied,
                 "_dw_sq": m["dw_sq"], "_w_sq": m["w_sq"]}
        if "nonfinite" in m:
            entry["nonfinite"] = m["nonfinite"]
        flips = sum(op_entries[i][name].get("flips", 0) for i in applied if isinstance(cfg.ops[i], BitflipOp))
        if any(isinstance(cfg.ops[i], BitflipOp) for i in applied):
            entry["flips"] = flips
        if any(isinstance(cfg.ops[i], PruneOp) for i in applied):
            entry["sparsity"] = (w == 0).sum().item() / max(1, w.numel())
        final[name] = entry
        del orig

    ops_out = []
    for i, op in enumerate(cfg.ops):
        ops_out.append({"index": i, "op": op.to_dict(), "description": op.describe(),
                        "totals": _totals(op_entries[i]),
                        "modules": {n: _public(e) for n, e in op_entries[i].items()}})
    config = getattr(model, "config", None)
    first = next(iter(module_of.values())).weight
    model_info = {"model_type": getattr(config, "model_type", None),
                  "num_hidden_layers": getattr(config, "num_hidden_layers", None),
                  "dtype": str(first.dtype).replace("torch.", ""), "device": str(first.device)}
    record = DamageRecord(config=cfg.to_dict(), seed=seed, model=model_info, ops=ops_out,
                          modules={n: _public(e) for n, e in final.items()}, totals=_totals(final),
                          elapsed_s=round(time.perf_counter() - t0, 3))
    log.info("degraded %d modules: total rel L2 %s in %.1fs", len(final), record.totals.get("rel_l2"),
             record.elapsed_s)
    return record


def summarize(record: DamageRecord | dict[str, Any]) -> str:
    """A short table: per module type, count, mean/max relative L2 and max |dW|."""
    d = record.to_dict() if isinstance(record, DamageRecord) else record
    groups: dict[str, list[dict[str, Any]]] = {}
    for name, e in d["modules"].items():
        groups.setdefault(name.rsplit(".", 1)[-1], []).append(e)

    def fmt(x: float | None, spec: str = ".4f") -> str:
        return "nan/inf" if x is None else format(x, spec)

    lines = [f"{'module':<14}{'count':>6}{'mean relL2':>12}{'max relL2':>12}{'max |dW|':>12}"]
    for key, es in groups.items():
        rels = [e["rel_l2"] for e in es]
        finite = [r for r in rels if r is not None]
        mean = sum(finite) / len(finite) if finite and len(finite) == len(rels) else None
        mx = max(finite) if finite and len(finite) == len(rels) else None
        maxes = [e["max_abs"] for e in es]
        mabs = max(maxes) if all(m is not None for m in maxes) else None
        lines.append(f"{key:<14}{len(es):>6}{fmt(mean):>12}{fmt(mx):>12}{fmt(mabs, '.4g'):>12}")
    t = d["totals"]
    tail = f"total: {t['n_modules']} modules, {t['n_params']:,} weights, rel L2 {fmt(t.get('rel_l2'))}"
    if "flips" in t:
        tail += f", {t['flips']} bit flips"
    if "sparsity" in t:
        tail += f", sparsity {t['sparsity']:.3f}"
    if "nonfinite" in t:
        tail += f", {t['nonfinite']} non-finite weights"
    lines.append(tail)
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------------------------


def save_degraded(model: nn.Module, tokenizer: Any, record: DamageRecord | dict[str, Any], out_dir: str | Path,
                  overwrite: bool = False) -> Path:
    """Write a plain HF model folder (safetensors) plus ``damage.json``.

    Everything is written into ``<out_dir>.tmp`` and renamed at the end, so a folder named
    ``out_dir`` is always complete. An existing ``out_dir`` is replaced only with ``overwrite``.
    """
    from .load import save_model_dir

    out = Path(out_dir)
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise RecoverLoraError(f"{out} already exists; pass overwrite=True (--overwrite) to replace it")
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    save_model_dir(model, tmp, tokenizer)
    d = record.to_dict() if isinstance(record, DamageRecord) else record
    atomic_write_json(tmp / "damage.json", d)
    if out.exists():
        old = out.with_name(out.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
    return out


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def run_cli(args) -> int:
    """``recover-lora degrade`` (``commands.DegradeCmd``)."""
    from .load import load_model, load_tokenizer

    ops = parse_damage(args.damage)
    cfg = DegradeConfig(ops=ops, seed=args.seed, modules=parse_modules(args.modules) or ["all-linear"],
                        layers=parse_layers(args.layers), include_embeddings=args.include_embeddings)
    out = Path(args.out_dir)
    if out.exists() and not args.overwrite and (not out.is_dir() or any(out.iterdir())):
        raise RecoverLoraError(f"{out} already exists; pass --overwrite to replace it")
    lcfg = args.load
    print(f"loading {args.model} ...", flush=True)
    model = load_model(args.model, lcfg)
    tokenizer = load_tokenizer(args.model, lcfg)
    print("applying " + "; ".join(op.describe() for op in ops) + f" (seed {cfg.seed})", flush=True)
    record = degrade(model, cfg)
    record.model["source"] = str(args.model)
    print(summarize(record))
    save_degraded(model, tokenizer, record, out, overwrite=args.overwrite)
    print(f"wrote {out} ({record.elapsed_s:.1f}s of damage)")
    return 0
