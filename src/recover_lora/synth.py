"""Stage 3, synthesize: hybrid-sampled synthetic text from the reference (LLM-QAT style).

Each sequence starts from a uniformly random non-special vocabulary token (after BOS when the
model expects one), the next 3-5 tokens (drawn per sequence) are greedy, the rest are top-k
sampled at temperature T to the target length. Generation is batched with a KV cache.

Output: a folder of token-id shards (``shard-00000.safetensors``, written atomically) and a
``manifest.json`` (settings, seed, reference fingerprint). Shard ``i`` depends only on the seed
and ``i``, so an interrupted run resumes by generating the missing shards, with the same result.
"""

from __future__ import annotations

import copy
import inspect
import math
import zlib
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save
from tqdm.auto import tqdm
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase, StaticCache

from .errors import Interrupted
from .forward import cpu_has_bf16
from .load import fingerprint, needs_bos
from .utils import RecoverLoraError, atomic_write_bytes, atomic_write_json, log, read_json, sigterm_as_interrupt
from .config import SynthConfig  # noqa: F401 - re-exported
from .training.parallel import barrier, dist_rank_world

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
HELDOUT_SEED = 1_000_003  # held-out data never shares a seed with training data


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


def check_token_ids(ids: torch.Tensor, vocab_size: int | None, source: str) -> None:
    """Refuse token ids that cannot index the vocabulary (``vocab_size`` None: no upper bound), naming ``source``.

    Float ids would be cast silently (1.7 -> 1) and negative ones index the embedding from its end
    or crash deep in a kernel, so they stop here, as do ids >= ``vocab_size``.
    """
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise RecoverLoraError(f"{source} holds token ids of dtype {str(ids.dtype).removeprefix('torch.')}; "
                               "token ids must be integers")
    if ids.numel() == 0:
        return
    if ids.dtype in (torch.uint16, torch.uint32, torch.uint64):
        ids = ids.long()  # min/max are not implemented for these
    if (lo := int(ids.min())) < 0:
        raise RecoverLoraError(f"{source} holds negative token ids (minimum {lo}); token ids must be >= 0")
    if vocab_size is not None and (hi := int(ids.max())) >= vocab_size:
        raise RecoverLoraError(f"{source} holds token ids up to {hi}, beyond this model's vocabulary of {vocab_size}")


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


GRAPH_MODES = ("auto", "compile", "cuda_graph", "none")


def _static_cache(config, length: int):
    """A static KV cache for ``length`` tokens.

    When every sequence fits inside the sliding window (Gemma-3: 512 tokens), sliding-window
    layers behave exactly like full-attention ones, so all layers get a plain static layer: its
    position counter lives on the device, which is what CUDA graphs and torch.compile need (the
    sliding static layer keeps a Python counter that a captured graph would freeze and that makes
    torch.compile recompile every step).
    """
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    window = getattr(text, "sliding_window", None)
    types = getattr(text, "layer_types", None) or []
    if window and length <= window and types and set(types) <= {"full_attention", "sliding_attention"}:
        try:
            from transformers.cache_utils import Cache, StaticLayer
            return Cache(layers=[StaticLayer(max_cache_len=length) for _ in types])
        except Exception:  # noqa: BLE001 - other transformers versions: the generic cache below
            pass
    return StaticCache(config=config, max_cache_len=length)


class Decoder:
    """One batch of hybrid-sampled sequences with a KV cache.

    ``kind`` is the cache ("static", "dynamic", or "auto": static on GPU). With a static cache on
    GPU each decode step (forward + sampling, fused into one function) runs as a CUDA graph:
    ``"cuda_graph"`` (a graph captured by hand around the eager step: no compile time; what
    "auto" picks; refused for caches with sliding-window layers, whose Python-side counters a
    captured graph would freeze) or ``graph="compile"`` (torch.compile, mode reduce-overhead;
    "auto" for sliding-window caches). Should either fail, the batch is decoded again eagerly; ``self.mode`` says which
    path ran. The loop does no host synchronisation until the finished batch is copied back.
    """

    def __init__(self, model: PreTrainedModel, batch: int, length: int, kind: str, graph: str = "auto"):
        if graph not in GRAPH_MODES:
            raise RecoverLoraError(f"unknown graph mode {graph!r}; use one of {GRAPH_MODES}")
        self.model, self.batch, self.length = model, batch, length
        self.device = next(model.parameters()).device
        if kind == "auto":
            kind = "static"  # on CPU too: 552 vs 459 tokens/s at batch 256 (bf16 SmolLM2, BENCHMARKS.md)
        self.kind = kind
        self.cache = None
        if kind == "static":
            self.cache = _static_cache(model.config, length)
        if kind != "static" or self.device.type != "cuda" or graph == "none":
            graph = "none"
        elif graph == "auto":
            # The hand-captured graph measured fastest (bench: 135k vs 81k tokens/s on SmolLM2,
            # H100) and needs no compile; caches with sliding-window layers need torch.compile.
            sliding = any(getattr(layer, "is_sliding", False) for layer in getattr(self.cache, "layers", []))
            graph = "compile" if sliding else "cuda_graph"
        self.mode = graph  # "compile" | "cuda_graph" | "none"; falls back to "none" on failure
        self.error: str | None = None  # why a graph mode fell back
        self._compiled = None
        self._graph = None
        self._graph_key = None
        try:
            params = inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            params = {}
        self._keep_kw = "logits_to_keep" in params
        # transformers >= 5.24 names the cache argument `cache` (and warns on the old name)
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=ids, **{self._cache_kw: self.cache}, cache_position=pos,
                         position_ids=pos.unsqueeze(0).expand(ids.shape[0], -1), use_cache=True,
                         **({"logits_to_keep": 1} if self._keep_kw else {}))
        return out.logits[:, -1, :]

    def _step_sample(self, ids: torch.Tensor, pos: torch.Tensor, greedy: torch.Tensor, noise: torch.Tensor,
                     top_k: int, temperature: float) -> torch.Tensor:
        """One decode step: token ids [B, 1] at position ``pos`` [1] -> next token ids [B]."""
        return sample_next(self._forward(ids, pos), greedy, noise, top_k, temperature)

    # -- CUDA graph captured by hand -------------------------------------------------------
    def _graph_body(self) -> torch.Tensor:
        nxt = self._step_sample(self._g_ids, self._g_pos, self._g_greedy, self._g_noise, *self._graph_key)
        self._g_ids.copy_(nxt.unsqueeze(1))  # the next replay reads its own output
        return nxt

    def _capture(self, prefix: torch.Tensor, top_k: int, temperature: float) -> None:
        if any(getattr(layer, "is_sliding", False) for layer in getattr(self.cache, "layers", [])):
            raise RecoverLoraError("sliding-window cache layers keep Python counters; not capturable")
        B, P = prefix.shape
        dev = self.device
        self._graph_key = (top_k, temperature)
        self.cache.reset()
        # A real prefill first: the static cache allocates its tensors lazily, on first use.
        logits = self._forward(prefix, torch.arange(P, device=dev))
        self._g_ids = logits.argmax(-1, keepdim=True)
        self._g_pos = torch.full((1,), P, dtype=torch.long, device=dev)
        self._g_greedy = torch.zeros(B, dtype=torch.bool, device=dev)
        self._g_noise = torch.full((B, top_k), 0.5, device=dev)
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up (cuBLAS workspaces, lazy inits) outside the capture
                self._graph_body()
                self._g_pos.add_(1)
        torch.cuda.current_stream(dev).wait_stream(side)
        self._g_pos.fill_(P)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._g_out = self._graph_body()
        self._graph = graph
        self.cache.reset()  # in place: the captured addresses stay valid

    # -- the loop ----------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, prefix: torch.Tensor, n_greedy: torch.Tensor, noise: torch.Tensor, top_k: int,
            temperature: float) -> torch.Tensor:
        """prefix [B, P] -> tokens [B, length]; noise [B, length - P, top_k]."""
        if self.mode != "none":
            try:
                return self._run(prefix, n_greedy, noise, top_k, temperature, self.mode)
            except Exception as e:  # noqa: BLE001 - any compile/capture failure: decode eagerly
                self.error = f"{type(e).__name__}: {e}"[:500]
                log.warning("decode with %s failed (%s); decoding eagerly", self.mode, self.error)
                self.mode = "none"
                self._graph = self._compiled = None
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
        return self._run(prefix, n_greedy, noise, top_k, temperature, "none")

    def _run(self, prefix: torch.Tensor, n_greedy: torch.Tensor, noise: torch.Tensor, top_k: int,
             temperature: float, mode: str) -> torch.Tensor:
        B, P = prefix.shape
        dev = self.device
        steps = self.length - P
        out = torch.empty(B, self.length, dtype=torch.long, device=dev)
        out[:, :P] = prefix.to(dev)
        if steps <= 0:
            return out.cpu()
        if mode == "cuda_graph" and (self._graph is None or self._graph_key != (top_k, temperature)):
            if steps < 4:
                raise RecoverLoraError("too few decode steps to capture a graph")
            self._capture(out[:, :P], top_k, temperature)
        if mode == "compile" and self._compiled is None:
            self._compiled = torch.compile(self._step_sample, mode="reduce-overhead", fullgraph=False,
                                           dynamic=False)
        if self.kind == "static":
            self.cache.reset()
        else:
            self.cache = DynamicCache(config=self.model.config)
        # Per-step inputs laid out step-major, so that each step reads contiguous slices, and
        # prepared on the device up front: no host-to-device copy (a sync) inside the loop.
        positions = torch.arange(self.length, device=dev)
        greedy = torch.arange(steps, device=dev).unsqueeze(1) < n_greedy.to(dev).unsqueeze(0)  # [steps, B]
        noise = noise.to(dev).transpose(0, 1).contiguous()  # [steps, B, top_k]
        # Prefill runs eagerly (its shape differs from the decode steps).
        nxt = sample_next(self._forward(out[:, :P], positions[:P]), greedy[0], noise[0], top_k, temperature)
        out[:, P] = nxt
        if mode == "cuda_graph":
            self._g_ids.copy_(nxt.unsqueeze(1))
        for t in range(P + 1, self.length):
            j = t - P
            if mode == "cuda_graph":
                self._g_pos.copy_(positions[t - 1:t])
                self._g_greedy.copy_(greedy[j])
                self._g_noise.copy_(noise[j])
                self._graph.replay()
                out[:, t] = self._g_out
            elif mode == "compile":
                torch.compiler.cudagraph_mark_step_begin()
                nxt = self._compiled(nxt.unsqueeze(1), positions[t - 1:t], greedy[j], noise[j], top_k,
                                     temperature).clone()  # [B] ids: the graph reuses its output buffer
                out[:, t] = nxt
            else:
                nxt = self._step_sample(nxt.unsqueeze(1), positions[t - 1:t], greedy[j], noise[j], top_k,
                                        temperature)
                out[:, t] = nxt
        return out.cpu()


CPU_BATCH = 256  # decode batch on CPU: the measured knee on SmolLM2 (BENCHMARKS.md, CPU section)


def decode_dtype(model: PreTrainedModel, cfg: SynthConfig) -> torch.dtype:
    """The weight dtype synthesis decodes with (see ``SynthConfig.dtype``)."""
    own = next(model.parameters()).dtype
    if cfg.dtype == "auto":
        on_cpu = next(model.parameters()).device.type == "cpu"
        return torch.bfloat16 if on_cpu and own == torch.float32 and cpu_has_bf16() else own
    return own if cfg.dtype == "model" else getattr(torch, cfg.dtype)


def generate_shard(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, cfg: SynthConfig,
                   shard: int, n: int, bos: bool, progress: tqdm | None = None,
                   decoders: dict[int, Decoder] | None = None) -> torch.Tensor:
    """Generate shard ``shard`` (n sequences). All randomness comes from (seed, shard).

    ``decoders`` (batch size -> decoder) lets consecutive shards reuse one captured graph.
    """
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
    on_gpu = next(model.parameters()).device.type == "cuda"
    bs = cfg.batch_size or (1024 if on_gpu else CPU_BATCH)
    out = []
    decoders = {} if decoders is None else decoders
    for i in range(0, n, bs):
        b = min(bs, n - i)
        rows = torch.arange(i, i + b)
        if on_gpu and b < bs and bs in decoders:
            # Pad a short last batch with copies of its first row and drop them afterwards: the
            # graph captured for full batches is reused instead of capturing/compiling another.
            rows = torch.cat([rows, rows[:1].repeat(bs - b)])
        size = len(rows)
        if size not in decoders:
            decoders[size] = Decoder(model, size, cfg.seq_len, cfg.cache)
        out.append(decoders[size].run(prefix[rows], n_greedy[rows], noise[rows], cfg.top_k, cfg.temperature)[:b])
        if progress is not None:
            progress.update(b)
    return torch.cat(out).to(torch.int32)


def _missing_shards(out_dir: Path, cfg: SynthConfig, n_shards: int, have: list[dict]) -> list[tuple[int, int, str]]:
    """(shard, sequences, file) of each shard still to make; whole shards already there go to ``have``."""
    todo = []
    for s in range(n_shards):
        n = min(cfg.shard_size, cfg.num_sequences - s * cfg.shard_size)
        name = f"shard-{s:05d}.safetensors"
        path = out_dir / name
        if path.exists():
            try:
                ids = load_file(str(path))["input_ids"]
                if tuple(ids.shape) == (n, cfg.seq_len):
                    have.append({"file": name, "num_sequences": n})
                    continue
            except Exception:  # noqa: BLE001 - an unreadable shard is simply regenerated
                pass
        todo.append((s, n, name))
    return todo


def settings_key(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, cfg: SynthConfig) -> dict:
    """What a folder's manifest records as its settings (folders are reused only when it is equal):
    the settings that change the tokens, BOS, and the decode dtype where it is not the model's."""
    bos = needs_bos(tokenizer, model.config) if cfg.add_bos is None else cfg.add_bos
    key = {**cfg.content_key(), "add_bos": bos}
    dtype = decode_dtype(model, cfg)
    if dtype != next(model.parameters()).dtype:  # decoded by a copy in another dtype: other tokens
        key["decode_dtype"] = str(dtype).removeprefix("torch.")
    return key


def heldout_config(cfg: SynthConfig, n: int, offset: int = HELDOUT_SEED) -> SynthConfig:
    """The settings :func:`heldout` makes ``n`` held-out sequences with."""
    return replace(cfg, num_sequences=n, seed=cfg.seed + offset)


def synthesize(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, cfg: SynthConfig,
               out_dir: str | Path, progress: bool = True) -> Path:
    """Generate (or finish generating) a synthetic data set in ``out_dir``; returns the folder.

    An existing folder made with the same settings and reference is resumed; one made with other
    settings is refused rather than silently mixed.

    Under torchrun / accelerate launch (torch.distributed initialised) the missing shards are
    split across ranks (rank r makes the r-th, (r+W)-th, ... of them), each rank writes its own
    shard files, rank 0 alone writes the manifest, and every rank returns once the folder is
    complete. Shard contents depend only on (seed, shard), so the data equal a one-process run's.
    """
    cfg.validate()
    out_dir = Path(out_dir)
    bos = needs_bos(tokenizer, model.config) if cfg.add_bos is None else cfg.add_bos
    if bos and tokenizer.bos_token_id is None:
        raise RecoverLoraError("add_bos is set but the tokenizer has no BOS token")
    fp = fingerprint(model)
    dtype = decode_dtype(model, cfg)
    key = settings_key(model, tokenizer, cfg)
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
    rank, world = dist_rank_world()
    todo = _missing_shards(out_dir, cfg, n_shards, man["shards"])
    if world > 1:
        # Every rank has scanned the folder before any writes to it: they all hold the same list.
        barrier()
    if rank == 0:
        atomic_write_json(man_path, man)
    mine = todo[rank::world]  # fresh run: rank r makes shards r, r + W, r + 2W, ...
    if world > 1:
        total, done = sum(n for _, n, _ in mine), 0
    else:
        total, done = cfg.num_sequences, cfg.num_sequences - sum(n for _, n, _ in todo)
    bar = tqdm(total=total, initial=done, desc="synthesize", unit="seq", disable=not progress or rank != 0)
    decoders: dict[int, Decoder] = {}  # shared by all shards: one graph capture per batch size
    if mine and dtype != next(model.parameters()).dtype:  # a decode copy; the model itself stays as it is
        model = copy.deepcopy(model).to(dtype)
    try:
        with sigterm_as_interrupt():
            for s, n, name in mine:
                ids = generate_shard(model, tokenizer, cfg, s, n, bos, bar, decoders)
                atomic_write_bytes(out_dir / name, save({"input_ids": ids.contiguous()}))
                if world == 1:
                    man["shards"].append({"file": name, "num_sequences": n})
                    man["shards"].sort(key=lambda x: x["file"])
                    atomic_write_json(man_path, man)
    except KeyboardInterrupt:
        # Shards are written atomically (a shard file is whole or absent), so the files decide.
        kept = cfg.num_sequences - sum(n for _, n, name in todo if not (out_dir / name).exists())
        raise Interrupted(f"synthesis interrupted after {kept} of {cfg.num_sequences} sequences; the finished "
                               f"shards in {out_dir} are kept: run the same command again to resume") from None
    finally:
        bar.close()
    if world > 1:
        barrier()  # every rank's shards are on disk
        man["shards"] = sorted(man["shards"] + [{"file": name, "num_sequences": n} for _, n, name in todo],
                               key=lambda x: x["file"])
    man["complete"] = True
    if rank == 0:
        atomic_write_json(man_path, man)
    if world > 1:
        barrier()  # nobody reads the data before the manifest says it is complete
    log.info("synthetic data: %d x %d tokens in %s", cfg.num_sequences, cfg.seq_len, out_dir)
    return out_dir


def load_synthetic(path: str | Path) -> torch.Tensor:
    """All sequences of a finished synthetic data folder, as one [N, L] int64 tensor.

    A shard that cannot be read or holds non-integer or negative ids is refused by name.
    """
    path = Path(path)
    man_path = path / MANIFEST
    if not man_path.exists():
        raise RecoverLoraError(f"{path} is not a synthetic data folder (no {MANIFEST})")
    man = read_json(man_path)
    if not man.get("complete"):
        raise RecoverLoraError(f"{path} is incomplete: rerun `recover-lora synth` with the same settings to finish it")
    parts = []
    for s in man["shards"]:
        file = path / s["file"]
        try:
            ids = load_file(str(file))["input_ids"]
        except Exception as e:  # noqa: BLE001 - missing, truncated, or without input_ids: name the file
            raise RecoverLoraError(f"{file} cannot be read ({type(e).__name__}: {e})") from e
        check_token_ids(ids, None, str(file))
        parts.append(ids)
    return torch.cat(parts).long()


def manifest(path: str | Path) -> dict:
    return read_json(Path(path) / MANIFEST)


def heldout(reference: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, cfg: SynthConfig, n: int,
            out_dir: str | Path | None = None, progress: bool = True, offset: int = HELDOUT_SEED) -> torch.Tensor:
    """``n`` held-out sequences made as the training data is (``cfg``'s hybrid sampling) on a seed the
    training data never uses (``cfg.seed + offset``): written to ``out_dir`` and reused when complete,
    or, without a folder, made in memory in one shard."""
    cfg = heldout_config(cfg, n, offset)
    if out_dir is None:
        return generate_shard(reference, tokenizer, cfg, 0, n, needs_bos(tokenizer, reference.config)).long()
    synthesize(reference, tokenizer, cfg, out_dir, progress=progress)
    return load_synthetic(out_dir)
