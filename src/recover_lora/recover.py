"""The main job: synthesize, distill into LoRA adapters, measure, save, (optionally) evaluate.

    from recover_lora.recover import RecoverConfig, recover
    report = recover(RecoverConfig(reference="smollm2", degraded="damaged/", out_dir="runs/r1"))

Every stage writes into ``out_dir``; running the same command again after an interruption reuses
the synthetic data that is there and resumes training from the last checkpoint.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .baselines import (METHODS, FullKDConfig, SFTConfig, degraded_view, prepare_full_kd, run_full_kd,
                        run_sft_lora, snapshot_state)
from .distill import (AdapterConfig, DistillConfig, TrainState, init_distributed, measure,
                      trainable_parameters, train)
from .load import LoadConfig, fingerprint, load_pair, save_model_dir, vocab_size
from .svd_init import SVD_INITS, attach_with_init
from .synth import SynthConfig, barrier, load_synthetic, manifest, synthesize
from .utils import RecoverLoraError, atomic_write_json, log, save_figure

HELDOUT_SEED_OFFSET = 1_000_003  # held-out data never shares a seed with training data


@dataclass
class RecoverConfig:
    """Everything a repair needs; ``recover-lora recover --config run.yaml`` reads the same fields."""

    reference: str = "smollm2"
    degraded: str = ""
    out_dir: str = "runs/recover"
    data: str | None = None  # an existing synthetic data folder; generated into out_dir/synth if None
    heldout_sequences: int = 64
    merge: bool = False  # also write a merged model folder
    eval_tasks: list[str] | None = None
    eval_data: str | None = None
    eval_limit: int | None = None
    load: LoadConfig = field(default_factory=lambda: LoadConfig(dtype="auto"))
    synth: SynthConfig = field(default_factory=lambda: SynthConfig(num_sequences=0))  # 0 = one epoch of steps
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    placement: str = "preset"  # "preset": adapter.modules/layers/rank; "auto": diagnose, then plan per-module ranks
    placement_budget: int | None = None  # auto: trainable parameters; None = attn-mlp at adapter.rank on all layers
    distill: DistillConfig = field(default_factory=DistillConfig)
    method: str = "recover-lora"  # recover-lora | full-kd (all weights, LLM-QAT*) | sft-lora (labeled train splits)
    full_kd: FullKDConfig = field(default_factory=FullKDConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RecoverConfig":
        d = dict(d)
        subs = {"load": LoadConfig, "synth": SynthConfig, "adapter": AdapterConfig, "distill": DistillConfig,
                "full_kd": FullKDConfig, "sft": SFTConfig}
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise RecoverLoraError(f"unknown config keys {sorted(unknown)}; known: {sorted(known)}")
        for k, typ in subs.items():
            if k in d and isinstance(d[k], dict):
                bad = set(d[k]) - set(typ.__dataclass_fields__)
                if bad:
                    raise RecoverLoraError(f"unknown keys {sorted(bad)} in '{k}'; known: {sorted(typ.__dataclass_fields__)}")
                base = getattr(cls(), k)
                d[k] = typ(**{**asdict(base), **d[k]})
        return cls(**d)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "RecoverConfig":
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise RecoverLoraError(f"cannot read config {path}: {e}") from None
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def train_synth_config(cfg: RecoverConfig) -> SynthConfig:
    s = SynthConfig(**asdict(cfg.synth))
    if s.num_sequences <= 0:
        # One pass over fresh data: as many sequences as the training run consumes.
        s.num_sequences = max(cfg.distill.steps * cfg.distill.batch_size * cfg.distill.grad_accum,
                              cfg.distill.batch_size)
    return s


def heldout_synth_config(cfg: RecoverConfig) -> SynthConfig:
    s = train_synth_config(cfg)
    s.num_sequences = cfg.heldout_sequences
    s.seed = s.seed + HELDOUT_SEED_OFFSET
    return s


def make_heldout(cfg: RecoverConfig, reference: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 progress: bool = True) -> torch.Tensor:
    """The held-out synthetic sequences of a run (``out_dir/heldout``; reused when complete)."""
    held_dir = Path(cfg.out_dir) / "heldout"
    synthesize(reference, tokenizer, heldout_synth_config(cfg), held_dir, progress=progress)
    return load_synthetic(held_dir)


def placement_plan(cfg: RecoverConfig, reference: PreTrainedModel, degraded: PreTrainedModel,
                   tokenizer: PreTrainedTokenizerBase, held_ids: torch.Tensor, write: bool = True):
    """``--placement auto``: diagnose on ``held_ids`` and plan per-module ranks, or reuse
    ``out_dir/diagnosis/plan.json`` (a resumed run, or one given a sibling's plan)."""
    from .placement import auto_plan

    return auto_plan(reference, degraded, tokenizer, held_ids, Path(cfg.out_dir) / "diagnosis",
                     rank=cfg.adapter.rank, alpha=cfg.adapter.alpha, budget=cfg.placement_budget,
                     dropout=cfg.adapter.dropout, init=cfg.adapter.init, write=write)


def plot_training(history: list[dict], evals: list[dict], before: dict, after: dict, path: str | Path) -> Path:
    """Loss curve (log scale) with held-out KL points; the file a user looks at first."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if history:
        ax.plot([h["step"] for h in history], [h["loss"] for h in history], lw=1, alpha=0.8, label="train loss")
    pts = [{"step": 0, **before}] + evals + ([{"step": history[-1]["step"], **after}] if history else [])
    ax.plot([p["step"] for p in pts], [p["kl"] for p in pts], "o-", color="C3", label="held-out KL")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("KL(reference || student), nats/token")
    ax.set_title(f"held-out KL {before['kl']:.3f} -> {after['kl']:.3f}, "
                 f"top-1 {100 * before['top1']:.1f}% -> {100 * after['top1']:.1f}%")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, path)


def recover(cfg: RecoverConfig, reference: PreTrainedModel | None = None, degraded: PreTrainedModel | None = None,
            tokenizer: PreTrainedTokenizerBase | None = None, progress: bool = True) -> dict[str, Any]:
    """Run the whole repair and return the report (also written to ``out_dir/report.json``).

    Models may be passed in already loaded (the demo does); otherwise they are loaded from
    ``cfg.reference`` / ``cfg.degraded`` and checked for compatibility first.

    Under ``torchrun`` / ``accelerate launch`` every rank runs this function: synthesis is
    sharded across ranks, training is data-parallel, and rank 0 alone writes the outputs.
    """
    cfg.distill.validate()
    if cfg.method not in METHODS:
        raise RecoverLoraError(f"unknown method {cfg.method!r}; use one of {METHODS}")
    if cfg.placement not in ("preset", "auto"):
        raise RecoverLoraError(f"unknown placement {cfg.placement!r}; use preset or auto")
    rank, world = init_distributed()
    progress = progress and rank == 0
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    if reference is None or degraded is None or tokenizer is None:
        if not cfg.degraded:
            raise RecoverLoraError("no degraded model given")
        pair = load_pair(cfg.reference, cfg.degraded, cfg.load)
        reference, degraded, tokenizer = pair.reference, pair.degraded, pair.tokenizer
    device = next(reference.parameters()).device
    if rank == 0:
        atomic_write_json(out / "config.json", cfg.to_dict())

    # 1. synthetic data from the reference (resumable; reused when already complete)
    t0 = time.perf_counter()
    data_dir = Path(cfg.data) if cfg.data else out / "synth"
    train_ids = None
    if cfg.method != "sft-lora":  # sft-lora trains on labeled data; synthetic data is only held out
        if not cfg.data:
            synthesize(reference, tokenizer, train_synth_config(cfg), data_dir, progress=progress)
        train_ids = load_synthetic(data_dir)
        if cfg.data:
            made_by = manifest(data_dir).get("reference_fingerprint")
            if made_by != fingerprint(reference):
                log.warning("%s was generated by another reference (fingerprint %s, this one %s): "
                            "distilling toward this reference on another model's text", data_dir, made_by,
                            fingerprint(reference))
        if train_ids.max() >= vocab_size(reference):
            raise RecoverLoraError(f"{data_dir} holds token ids up to {int(train_ids.max())}, beyond this "
                                   f"model's vocabulary of {vocab_size(reference)}")
    held_ids = make_heldout(cfg, reference, tokenizer, progress)
    synth_s = time.perf_counter() - t0

    # 2. student = degraded + fresh LoRA (zero B: starts equal to degraded; init svd/eora: starts
    #    at the truncated SVD of W_ref - W_deg); full-kd: the degraded model itself, all weights
    snapshot, plan, sanitized = None, None, {}
    if cfg.method == "full-kd":
        snapshot = snapshot_state(degraded) if cfg.eval_tasks and rank == 0 else None
        n_modules = 0
        student = degraded
        n_train = prepare_full_kd(student, reference, cfg.full_kd)
    elif cfg.placement == "auto":
        # diagnose on the held-out sequences (or reuse out/diagnosis/plan.json when resuming), then
        # attach per-module ranks within the budget
        from .diagnose import sanitize_nonfinite
        from .placement import attach_planned_adapters

        plan = placement_plan(cfg, reference, degraded, tokenizer, held_ids, write=rank == 0)
        sanitized = sanitize_nonfinite(degraded)  # LoRA cannot cancel NaN/Inf weights; zeroed ones it can
        n_modules = len(plan.ranks)
        student = attach_planned_adapters(degraded, plan, seed=cfg.distill.seed, reference=reference,
                                          calib_ids=train_ids if train_ids is not None else held_ids)
        n_train = trainable_parameters(student)
    else:
        n_modules = len(cfg.adapter.target_modules(degraded))
        student = attach_with_init(degraded, cfg.adapter, reference, seed=cfg.distill.seed,
                                   calib_ids=train_ids if train_ids is not None else held_ids)
        n_train = trainable_parameters(student)
    svd_start = cfg.method != "full-kd" and cfg.adapter.init in SVD_INITS
    with student.disable_adapter() if svd_start else contextlib.nullcontext():  # "before" = the degraded model
        before = measure(student, reference, held_ids, cfg.distill.eval_batch_size, cfg.distill)
    log.info("before: held-out KL %.4f, top-1 %.3f; %d trainable parameters", before["kl"], before["top1"], n_train)
    at_init = measure(student, reference, held_ids, cfg.distill.eval_batch_size, cfg.distill) if svd_start else None
    if at_init:
        log.info("after %s init: held-out KL %.4f, top-1 %.3f", cfg.adapter.init, at_init["kl"], at_init["top1"])

    # 3. distillation (resumes from out_dir/checkpoint.pt)
    t0 = time.perf_counter()
    sft = None
    if cfg.method == "sft-lora":
        sft = run_sft_lora(student, tokenizer, None, cfg.sft.data_dir or cfg.eval_data, cfg.sft,
                           out / "checkpoint.pt", progress=progress)
        state = TrainState(step=sft["steps"], history=sft["history"], elapsed=sft["seconds"])
    elif cfg.method == "full-kd":
        state = run_full_kd(reference, student, train_ids, cfg.distill, held_ids, out / "checkpoint.pt",
                            cfg.full_kd, progress=progress)
    else:
        state = train(student, reference, train_ids, cfg.distill, held_ids, out / "checkpoint.pt", progress=progress)
    train_s = time.perf_counter() - t0
    after = measure(student, reference, held_ids, cfg.distill.eval_batch_size, cfg.distill)
    log.info("after: held-out KL %.4f, top-1 %.3f", after["kl"], after["top1"])

    if rank != 0:
        barrier()  # wait until rank 0 has written the outputs, then leave
        return {"heldout": {"before": before, "after": after}, "rank": rank}

    # 4. outputs: PEFT adapter (standard format; for a GGUF degraded model also as a llama.cpp
    # LoRA) or, for full-kd, the whole model; report and plot
    gguf_lora = None
    if cfg.method == "full-kd":
        saved = save_model_dir(student, out / "model", tokenizer)
        tokens = state.step * cfg.distill.batch_size * cfg.distill.grad_accum * train_ids.shape[1]
    else:
        student.save_pretrained(str(out / "adapter"))
        saved = out / "adapter"
        gguf_lora = _gguf_lora(cfg.degraded, saved, out / "adapter.gguf")
        tokens = sft["loss_tokens"] if sft else \
            state.step * cfg.distill.batch_size * cfg.distill.grad_accum * train_ids.shape[1]
    report: dict[str, Any] = {
        "reference": cfg.reference, "degraded": cfg.degraded, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "heldout": {"sequences": len(held_ids), "seq_len": held_ids.shape[1], "before": before, "after": after,
                    **({"init": at_init} if at_init else {})},
        "trainable_parameters": n_train, "processes": world,
        "adapter_modules": n_modules,
        "placement": ({"kind": "auto", "diagnosis": str(out / "diagnosis"), "sanitized_nonfinite": sanitized,
                       **plan.to_dict()} if plan is not None else
                      {"kind": "preset", "modules": cfg.adapter.modules, "layers": cfg.adapter.layers,
                       "rank": cfg.adapter.rank}),
        "method": cfg.method, "init": cfg.adapter.init if cfg.method != "full-kd" else None,
        "steps": state.step, "train_tokens": tokens, "step_mode": state.step_mode,
        "synthetic_sequences": len(train_ids) if train_ids is not None else 0,
        "seconds": {"synthesize": round(synth_s, 2), "train": round(train_s, 2)},
        "train_tokens_per_second": round(tokens / train_s, 1) if train_s > 0 and state.step else None,
        "loss_curve": state.history, "heldout_curve": state.evals,
        "adapter": str(saved) if cfg.method != "full-kd" else None,
        "model": str(saved) if cfg.method == "full-kd" else None, "config": cfg.to_dict(),
    }
    if gguf_lora:
        report["gguf_lora"] = str(gguf_lora)
    if sft:
        report["sft"] = {k: v for k, v in sft.items() if k not in ("history", "config")}
    plot_training(state.history, state.evals, before, after, out / "loss.png")
    if cfg.eval_tasks:  # before merging: the degraded model is the student with adapters disabled
        report["eval"] = evaluate_triplet(cfg, reference, student, tokenizer, out, progress, snapshot)
    if cfg.merge and cfg.method != "full-kd":  # full-kd's out/model already is the whole model
        save_model_dir(student.merge_and_unload(), out / "merged", tokenizer)
        report["merged"] = str(out / "merged")
    report["seconds"]["total"] = round(time.perf_counter() - t_start, 2)
    atomic_write_json(out / "report.json", report)
    if world > 1:
        barrier()
    return report


def _gguf_lora(degraded: str | None, adapter: Path, out: Path) -> Path | None:
    """A degraded GGUF file gets its repair as a llama.cpp LoRA too (export.export_gguf_lora)."""
    from .export import export_gguf_lora
    from .load import resolve_spec

    path = Path(resolve_spec(degraded)) if degraded else None
    if path is None or path.suffix != ".gguf" or not path.is_file():
        return None
    try:
        return export_gguf_lora(adapter, path, out)
    except RecoverLoraError as e:  # the PEFT adapter is the result; the GGUF copy is a convenience
        log.warning("no GGUF LoRA written: %s", e)
        return None


def evaluate_triplet(cfg: RecoverConfig, reference: PreTrainedModel, student, tokenizer: PreTrainedTokenizerBase,
                     out: Path, progress: bool = True, snapshot: dict | None = None) -> dict[str, Any]:
    """Benchmarks on reference, degraded (adapters disabled) and recovered; writes the eval report."""
    from .evaluate import EvalConfig, evaluate
    from .report import build_report

    ecfg = EvalConfig(tasks=cfg.eval_tasks, data_dir=cfg.eval_data, limit=cfg.eval_limit)
    results = {"reference": evaluate(reference, tokenizer, ecfg, progress=progress)}
    with degraded_view(student, snapshot):  # adapters off, or full-kd's pre-training weights
        results["degraded"] = evaluate(student, tokenizer, ecfg, progress=progress)
    results["recovered"] = evaluate(student, tokenizer, ecfg, progress=progress)
    for name, res in results.items():
        atomic_write_json(out / "eval" / f"{name}.json", res)
    return build_report(results["reference"], results["degraded"], results["recovered"], out / "eval")
