"""Stage 3, synthesize: hybrid-sampled synthetic text from the reference (LLM-QAT style).

Each sequence starts from a uniformly random non-special vocabulary token (after BOS when the
model expects one), the next 3-5 tokens (drawn per sequence) are greedy, the rest are top-k
sampled at temperature T to the target length. Generation is batched with a KV cache.

Output: a folder of token-id shards (``shard-00000.safetensors``, written atomically) and a
``manifest.json`` (settings, seed, reference fingerprint). Shard ``i`` depends only on the seed
and ``i``, so an interrupted run resumes by generating the missing shards, with the same result.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save
from tqdm.auto import tqdm
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase, StaticCache

from .load import fingerprint, needs_bos
from .utils import RecoverLoraError, atomic_write_bytes, atomic_write_json, log, read_json

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


@dataclass
class SynthConfig:
    """Hybrid sampling settings. ``seq_len`` counts every token, BOS included."""

    num_sequences: int = 1024
    seq_len: int = 128
    greedy_min: int = 3
    greedy_max: int = 5
    top_k: int = 50
    temperature: float = 1.0
    seed: int = 0
    batch_size: int = 0  # 0 = auto: 16 on CPU, 1024 on GPU
    shard_size: int = 4096  # sequences per shard file
    add_bos: bool | None = None  # None = decide from the model (Gemma: yes)
    cache: str = "auto"  # "dynamic" | "static" | "auto" (static + CUDA graphs on GPU)

    def validate(self) -> None:
        if self.num_sequences < 1 or self.seq_len < 2:
            raise RecoverLoraError("synth needs num_sequences >= 1 and seq_len >= 2")
        if not 0 <= self.greedy_min <= self.greedy_max:
            raise RecoverLoraError(f"greedy_min {self.greedy_min} must be <= greedy_max {self.greedy_max}")
        if self.top_k < 1 or self.temperature <= 0:
            raise RecoverLoraError("top_k must be >= 1 and temperature > 0")
        if self.cache not in ("auto", "dynamic", "static"):
            raise RecoverLoraError(f"unknown cache {self.cache!r}; use auto, dynamic or static")

    def content_key(self) -> dict:
        """Settings that change the generated tokens (batch size and cache type do not)."""
        d = asdict(self)
        for k in ("batch_size", "cache", "num_sequences"):
            d.pop(k)
        return d


def start_token_pool(tokenizer: PreTrainedTokenizerBase, model_vocab: int) -> torch.Tensor:
    """Ids a sequence may start from: the tokenizer's vocabulary minus special and added tokens."""
    n = min(len(tokenizer), model_vocab)
    banned = set(tokenizer.all_special_ids)
    banned.update(getattr(tokenizer, "added_tokens_decoder", {}).keys())
    keep = torch.ones(n, dtype=torch.bool)
    for i in banned:
        if 0 <= i < n:
            keep[i] = False
    pool = keep.nonzero().squeeze(1)
    if pool.numel() == 0:
        raise RecoverLoraError("the tokenizer has no non-special tokens to start sequences from")
    return pool


def _shard_generator(seed: int, shard: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(zlib.crc32(f"synth:{seed}:{shard}".encode()) + seed * 1_000_003)
    return g


def sample_next(logits: torch.Tensor, greedy: torch.Tensor, noise: torch.Tensor, top_k: int,
                temperature: float) -> torch.Tensor:
    """Greedy where ``greedy`` is set, else top-k sampling via Gumbel-max on the top-k logits.

    ``noise`` is uniform(0,1) of shape [B, top_k], drawn by the caller so the draw is seeded and
    device independent. Gumbel-max over the top-k logits / T samples exactly softmax(top-k / T).
    """
    vals, idx = logits.float().topk(top_k, dim=-1)  # sorted: idx[:, 0] is the argmax
    gumbel = -torch.log(-torch.log(noise.clamp_(1e-10, 1.0 - 1e-7)))
    choice = (vals / temperature + gumbel).argmax(dim=-1, keepdim=True)
    sampled = idx.gather(-1, choice).squeeze(-1)
    return torch.where(greedy, idx[:, 0], sampled)


class _Decoder:
    """One batch of hybrid-sampled sequences with a KV cache; static cache + CUDA graphs on GPU."""

    def __init__(self, model: PreTrainedModel, batch: int, length: int, kind: str):
        self.model, self.batch, self.length = model, batch, length
        self.device = next(model.parameters()).device
        if kind == "auto":
            kind = "static" if self.device.type == "cuda" else "dynamic"
        self.kind = kind
        self.step_fn = self._step
        if kind == "static":
            self.cache = StaticCache(config=model.config, max_cache_len=length)
            if self.device.type == "cuda":
                # CUDA graphs remove the per-layer launch overhead that dominates small-model decode.
                self.step_fn = torch.compile(self._step, mode="reduce-overhead", fullgraph=False, dynamic=False)

    def _step(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=ids, past_key_values=self.cache, cache_position=pos,
                         position_ids=pos.unsqueeze(0).expand(ids.shape[0], -1), use_cache=True)
        return out.logits[:, -1, :]

    @torch.inference_mode()
    def run(self, prefix: torch.Tensor, n_greedy: torch.Tensor, noise: torch.Tensor, top_k: int,
            temperature: float) -> torch.Tensor:
        """prefix [B, P] -> tokens [B, length]; noise [B, length - P, top_k]."""
        if self.kind == "static":
            self.cache.reset()
        else:
            self.cache = DynamicCache(config=self.model.config)
        B, P = prefix.shape
        dev = self.device
        out = torch.empty(B, self.length, dtype=torch.long, device=dev)
        out[:, :P] = prefix.to(dev)
        n_greedy = n_greedy.to(dev)
        noise = noise.to(dev)
        # Prefill runs eagerly (its shape differs from the decode steps).
        logits = self._step(out[:, :P], torch.arange(P, device=dev))
        for t in range(P, self.length):
            greedy = (t - P) < n_greedy
            nxt = sample_next(logits, greedy, noise[:, t - P], top_k, temperature)
            out[:, t] = nxt
            if t + 1 < self.length:
                logits = self.step_fn(nxt.unsqueeze(1), torch.tensor([t], device=dev)).clone()
        return out.cpu()


def generate_shard(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, cfg: SynthConfig,
                   shard: int, n: int, bos: bool, progress: tqdm | None = None) -> torch.Tensor:
    """Generate shard ``shard`` (n sequences). All randomness comes from (seed, shard)."""
    g = _shard_generator(cfg.seed, shard)
    pool = start_token_pool(tokenizer, model.get_output_embeddings().weight.shape[0])
    starts = pool[torch.randint(len(pool), (n,), generator=g)]
    n_greedy = torch.randint(cfg.greedy_min, cfg.greedy_max + 1, (n,), generator=g)
    prefix = starts.unsqueeze(1)
    if bos:
        prefix = torch.cat([torch.full((n, 1), tokenizer.bos_token_id), prefix], dim=1)
    steps = cfg.seq_len - prefix.shape[1]
    if steps < 0:
        raise RecoverLoraError(f"seq_len {cfg.seq_len} is shorter than the prefix")
    noise = torch.rand(n, max(steps, 0), cfg.top_k, generator=g)
    bs = cfg.batch_size or (1024 if next(model.parameters()).device.type == "cuda" else 16)
    out = []
    decoders: dict[int, _Decoder] = {}
    for i in range(0, n, bs):
        b = min(bs, n - i)
        if b not in decoders:
            decoders[b] = _Decoder(model, b, cfg.seq_len, cfg.cache)
        out.append(decoders[b].run(prefix[i:i + b], n_greedy[i:i + b], noise[i:i + b],
                                   cfg.top_k, cfg.temperature))
        if progress is not None:
            progress.update(b)
    return torch.cat(out).to(torch.int32)


def synthesize(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, cfg: SynthConfig,
               out_dir: str | Path, progress: bool = True) -> Path:
    """Generate (or finish generating) a synthetic data set in ``out_dir``; returns the folder.

    An existing folder made with the same settings and reference is resumed; one made with other
    settings is refused rather than silently mixed.
    """
    cfg.validate()
    out_dir = Path(out_dir)
    bos = needs_bos(tokenizer, model.config) if cfg.add_bos is None else cfg.add_bos
    if bos and tokenizer.bos_token_id is None:
        raise RecoverLoraError("add_bos is set but the tokenizer has no BOS token")
    fp = fingerprint(model)
    key = {**cfg.content_key(), "add_bos": bos}
    n_shards = math.ceil(cfg.num_sequences / cfg.shard_size)
    man_path = out_dir / MANIFEST
    if man_path.exists():
        man = read_json(man_path)
        if man.get("settings") != key or man.get("reference_fingerprint") != fp:
            raise RecoverLoraError(
                f"{out_dir} holds synthetic data made with other settings or another reference "
                f"({man.get('settings')}, fingerprint {man.get('reference_fingerprint')}); "
                "use a new folder or delete it")
    man = {"format": FORMAT_VERSION, "settings": key, "reference_fingerprint": fp,
           "num_sequences": cfg.num_sequences, "seq_len": cfg.seq_len,
           "model_type": model.config.model_type, "bos_token_id": tokenizer.bos_token_id if bos else None,
           "shards": [], "complete": False}
    todo = []
    for s in range(n_shards):
        n = min(cfg.shard_size, cfg.num_sequences - s * cfg.shard_size)
        name = f"shard-{s:05d}.safetensors"
        path = out_dir / name
        if path.exists():
            try:
                ids = load_file(str(path))["input_ids"]
                if tuple(ids.shape) == (n, cfg.seq_len):
                    man["shards"].append({"file": name, "num_sequences": n})
                    continue
            except Exception:  # noqa: BLE001 - an unreadable shard is simply regenerated
                pass
        todo.append((s, n, name))
    atomic_write_json(man_path, man)
    done = cfg.num_sequences - sum(n for _, n, _ in todo)
    bar = tqdm(total=cfg.num_sequences, initial=done, desc="synthesize", unit="seq", disable=not progress)
    for s, n, name in todo:
        ids = generate_shard(model, tokenizer, cfg, s, n, bos, bar)
        atomic_write_bytes(out_dir / name, save({"input_ids": ids.contiguous()}))
        man["shards"].append({"file": name, "num_sequences": n})
        man["shards"].sort(key=lambda x: x["file"])
        atomic_write_json(man_path, man)
    bar.close()
    man["complete"] = True
    atomic_write_json(man_path, man)
    log.info("synthetic data: %d x %d tokens in %s", cfg.num_sequences, cfg.seq_len, out_dir)
    return out_dir


def load_synthetic(path: str | Path) -> torch.Tensor:
    """All sequences of a finished synthetic data folder, as one [N, L] int64 tensor."""
    path = Path(path)
    man_path = path / MANIFEST
    if not man_path.exists():
        raise RecoverLoraError(f"{path} is not a synthetic data folder (no {MANIFEST})")
    man = read_json(man_path)
    if not man.get("complete"):
        raise RecoverLoraError(f"{path} is incomplete: rerun `recover-lora synth` with the same settings to finish it")
    parts = [load_file(str(path / s["file"]))["input_ids"] for s in man["shards"]]
    return torch.cat(parts).long()


def manifest(path: str | Path) -> dict:
    return read_json(Path(path) / MANIFEST)


@dataclass
class SynthSplit:
    """Train and held-out synthetic data; the held-out set uses a different seed."""

    train: SynthConfig = field(default_factory=SynthConfig)
    heldout_sequences: int = 64
