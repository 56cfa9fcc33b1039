"""The main job: synthesize, distill into LoRA adapters, measure, save, (optionally) evaluate.

    from recover_lora.recover import RecoverConfig, recover
    report = recover(RecoverConfig(reference="smollm2", degraded="damaged/", out_dir="runs/r1"))

Every stage writes into ``out_dir``; running the same command again after an interruption reuses
the synthetic data that is there and resumes training from the last checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .kl import KLMeter
from .methods import get_method
from .methods.full_kd import degraded_view
from .training.checkpoint import CADENCE_FIELDS
from .training.parallel import barrier, init_distributed
from .load import fingerprint, load_pair, save_model_dir, vocab_size
from .card import command_line, finish_adapter, write_merged_card
from .metrics import MetricsLog
from .provenance import nonfinite_weights, write_adapter_provenance, zero_nonfinite
from .run_dir import RunLock, check_identity, check_run_dir, run_identity, write_identity
from .config import SVD_INITS
from .synth import check_token_ids, heldout, load_synthetic, manifest, synthesize
from .utils import RecoverLoraError, atomic_write_json, log, save_figure
from .config import RecoverConfig, train_synth_config, typed_fields  # noqa: F401 - re-exported

def validate_config(cfg: RecoverConfig) -> None:
    """Every check that needs no model, so that a bad input fails before any work is done."""
    cfg.distill.validate()
    cfg.adapter.validate()
    method = get_method(cfg.method)
    if cfg.placement not in ("preset", "auto"):
        raise RecoverLoraError(f"unknown placement {cfg.placement!r}; use preset or auto")
    if method.adapters and cfg.placement == "auto" and (cfg.adapter.modules != "all-linear" or cfg.adapter.layers):
        raise RecoverLoraError(f"adapter.modules {cfg.adapter.modules!r} / adapter.layers {cfg.adapter.layers!r} "
                               "place the adapters by hand: add --placement preset (the default, auto, lets the "
                               "diagnosis choose modules and ranks)")
    if cfg.heldout_sequences < 1:
        raise RecoverLoraError(f"heldout_sequences must be >= 1, got {cfg.heldout_sequences}")
    if cfg.placement_budget is not None and cfg.placement_budget < 1:
        raise RecoverLoraError(f"placement_budget must be >= 1, got {cfg.placement_budget}")
    if cfg.time_budget is not None:
        from .budget import parse_duration

        cfg.time_budget = parse_duration(cfg.time_budget)
    if cfg.data and not (Path(cfg.data) / "manifest.json").exists():
        raise RecoverLoraError(f"--data {cfg.data} is not a synthetic data folder (no manifest.json)")
    synth = train_synth_config(cfg)
    synth.validate()
    if cfg.eval.tasks:  # reads and formats every item now, not after hours of training
        from .evaluate.runner import build_requests

        if cfg.eval.backend not in ("builtin", "lm-eval"):
            raise RecoverLoraError(f"eval.backend must be builtin or lm-eval, not {cfg.eval.backend!r}")
        if cfg.eval.backend == "lm-eval":
            from .evaluate.lmeval_backend import require_lmeval

            require_lmeval(cfg.eval.data_dir)
        if cfg.eval.limit is not None and cfg.eval.limit < 1:
            raise RecoverLoraError(f"eval.limit must be >= 1, got {cfg.eval.limit}")
        build_requests(cfg.eval)
    method.validate(cfg)


# Settings added after runs were made: at their default (off) they stay out of a run's identity, so
# that those runs still resume (as a checkpoint does, training/checkpoint.py).
LATER_DISTILL_FIELDS = {"rewind_rise": 0.0, "rewind_lr_scale": 1 / 3}


def config_identity(cfg: RecoverConfig) -> dict[str, Any]:
    """The config fields that determine the result (not where outputs go or when they are measured)."""
    distill = {k: v for k, v in asdict(cfg.distill).items() if k not in CADENCE_FIELDS
               and not (k in LATER_DISTILL_FIELDS and v == LATER_DISTILL_FIELDS[k])}
    synth = train_synth_config(cfg)  # what the tokens depend on, not how fast they were made
    ident: dict[str, Any] = {"method": cfg.method, "distill": distill, "heldout_sequences": cfg.heldout_sequences,
                             "synth": {**synth.content_key(), "num_sequences": synth.num_sequences},
                             "given_data": bool(cfg.data)}  # (keep_better_start: after training, not in it)
    return {**ident, **get_method(cfg.method).identity(cfg)}


def make_heldout(cfg: RecoverConfig, reference: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 progress: bool = True) -> torch.Tensor:
    """The held-out synthetic sequences of a run (``out_dir/heldout``; reused when complete)."""
    return heldout(reference, tokenizer, train_synth_config(cfg), cfg.heldout_sequences,
                   Path(cfg.out_dir) / "heldout", progress)


def plot_training(history: list[dict], evals: list[dict], before: dict, after: dict, path: str | Path,
                  start: dict | None = None, kept_start: bool = False, rewound_at: int = 0) -> Path:
    """Loss curve (log scale, with its 10-step running mean) and the held-out KL: the degraded model's
    level as a line, the points from the warm start's (``start``) when there is one, so that training
    that first undoes a start shows (and where a guarded run went back to it, ``rewound_at``); the file
    a user looks at first."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if history:
        steps, loss = [h["step"] for h in history], [h["loss"] for h in history]
        ax.plot(steps, loss, lw=0.8, alpha=0.45, color="C0", label="train loss (a batch)")
        k = 10
        if len(loss) >= 2 * k:  # one batch of 8 x 64 tokens is noisy: the mean shows the trend
            ax.plot(steps[k - 1:], np.convolve(loss, np.ones(k) / k, mode="valid"), lw=1.8, color="C0",
                    label=f"train loss, mean of {k} steps")
    ax.axhline(before["kl"], ls="--", lw=1, color="gray", label=f"degraded: held-out KL {before['kl']:.3f}")
    if rewound_at:
        ax.axvline(rewound_at, ls=":", lw=1.2, color="C2", label=f"loss rose: back to the start at step {rewound_at}")
    first = {"step": 0, **(start or before)}
    pts = [first] + evals + ([{"step": history[-1]["step"], **after}] if history else [])
    ax.plot([p["step"] for p in pts], [p["kl"] for p in pts], "o-", color="C3",
            label="held-out KL" + (" (from the warm start)" if start else ""))
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("KL(reference || student), nats/token")
    title = f"held-out KL {before['kl']:.3f} -> {after['kl']:.3f}"
    if start:
        title += f" (warm start {start['kl']:.3f}{', kept' if kept_start else ''})"
    ax.set_title(title + f", top-1 {100 * before['top1']:.1f}% -> {100 * after['top1']:.1f}%", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
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
    validate_config(cfg)
    if (reference is None or degraded is None or tokenizer is None) and not cfg.degraded:
        raise RecoverLoraError("no degraded model given")
    rank, world = init_distributed()
    out = Path(cfg.out_dir)
    check_run_dir(out)
    with RunLock(out) if rank == 0 else contextlib.nullcontext():  # one process a run folder
        return _recover(cfg, reference, degraded, tokenizer, progress and rank == 0, rank, world)


@dataclass
class Run:
    """What the stages of one recover() call (and its method) hand each other."""

    cfg: RecoverConfig
    out: Path
    reference: Any
    degraded: Any
    tokenizer: Any
    progress: bool
    rank: int
    world: int
    identity: dict = field(default_factory=dict)
    train_ids: torch.Tensor | None = None
    held_ids: torch.Tensor | None = None
    zeroed: dict = field(default_factory=dict)
    raw_before: dict | None = None
    student: Any = None
    plan: Any = None
    snapshot: dict | None = None
    n_train: int = 0
    n_modules: int = 0
    seconds: dict = field(default_factory=dict)
    meter: KLMeter | None = None
    start_state: dict | None = None  # a warm start's adapter weights (keep_better_start)
    start_check: dict | None = None  # what keep_better_start saw

    @property
    def method(self):
        return get_method(self.cfg.method)

    def measure(self, model) -> dict:
        """Held-out KL and top-1 (the reference's side computed once a run)."""
        self.meter = self.meter or KLMeter(self.reference, self.held_ids, self.cfg.distill.eval_batch_size,
                                           self.cfg.distill)
        return self.meter(model)


def _recover(cfg: RecoverConfig, reference, degraded, tokenizer, progress: bool, rank: int, world: int) -> dict:
    t_start = time.perf_counter()
    if reference is None or degraded is None or tokenizer is None:
        pair = load_pair(cfg.reference, cfg.degraded, cfg.load)
        reference, degraded, tokenizer = pair.reference, pair.degraded, pair.tokenizer
    if bad := nonfinite_weights(reference):
        raise RecoverLoraError(f"the reference {cfg.reference} holds NaN/Inf weights "
                               f"({dict(list(bad.items())[:3])}): it cannot teach")
    r = Run(cfg, Path(cfg.out_dir), reference, degraded, tokenizer, progress, rank, world)
    sized = plan_cost(cfg, reference, next(reference.parameters()).device, r.out, rank == 0)
    r.identity = run_identity(config_identity(cfg), reference, degraded, cfg.data)
    check_identity(r.out, r.identity, lambda old: config_identity(RecoverConfig.from_dict(old)))  # before any write
    if rank == 0:
        write_identity(r.out, r.identity)
        atomic_write_json(r.out / "config.json", cfg.to_dict())
    _data(r)  # 1. synthetic data from the reference
    r.method.student(r)  # 2. the degraded model with fresh adapters (full-kd: itself, every weight)
    before, at_init, zeroed_before = _starts(r)
    state, sft, after = _distill(r, before, at_init)  # 3. distillation (resumes from out/checkpoint.pt)
    if rank != 0:
        barrier()  # wait until rank 0 has written the outputs, then leave
        return {"heldout": {"before": before, "after": after}, "rank": rank}
    report = _report(r, state, sft, before, after, at_init, zeroed_before, sized)  # 4. outputs
    if r.start_check:
        report["warm_start_check"] = r.start_check
    report["seconds"]["total"] = round(time.perf_counter() - t_start, 2)
    atomic_write_json(r.out / "report.json", report)
    if world > 1:
        barrier()
    return report


def _data(r: Run) -> None:
    """Training ids (synthesized, resumably, or the given folder's; none for sft-lora, which trains
    on labeled data) and the held-out ids; NaN/Inf weights of the degraded model zeroed and recorded."""
    cfg, t0 = r.cfg, time.perf_counter()
    data_dir = Path(cfg.data) if cfg.data else r.out / "synth"
    if r.method.synthetic:
        if not cfg.data:
            synthesize(r.reference, r.tokenizer, train_synth_config(cfg), data_dir, progress=r.progress)
        r.train_ids = load_synthetic(data_dir)
        if cfg.data:
            made_by = manifest(data_dir).get("reference_fingerprint")
            if made_by != fingerprint(r.reference):
                log.warning("%s was generated by another reference (fingerprint %s, this one %s): "
                            "distilling toward this reference on another model's text", data_dir, made_by,
                            fingerprint(r.reference))
        check_token_ids(r.train_ids, vocab_size(r.reference), str(data_dir))
    r.held_ids = make_heldout(cfg, r.reference, r.tokenizer, r.progress)
    r.seconds["synthesize"] = round(time.perf_counter() - t0, 2)
    if nonfinite_weights(r.degraded):  # LoRA cannot cancel NaN/Inf: zero them, measure and record that
        r.raw_before = r.measure(r.degraded)
        r.zeroed = zero_nonfinite(r.degraded)


def _starts(r: Run) -> tuple[dict, dict | None, dict | None]:
    """Held-out KL of the degraded model ("before", as given: NaN/Inf included) and at a warm start."""
    svd_start = r.method.adapters and r.cfg.adapter.init in SVD_INITS
    with r.student.disable_adapter() if svd_start else contextlib.nullcontext():  # "before" = the degraded model
        before = r.measure(r.student)
    zeroed_before = None
    if r.raw_before is not None:  # "before" is the model as given; the zeroed one is reported beside it
        before, zeroed_before = r.raw_before, before
    log.info("before: held-out KL %.4f, top-1 %.3f; %d trainable parameters", before["kl"], before["top1"], r.n_train)
    at_init = r.measure(r.student) if svd_start else None
    if at_init:
        log.info("after %s init: held-out KL %.4f, top-1 %.3f", r.cfg.adapter.init, at_init["kl"], at_init["top1"])
        if r.cfg.keep_better_start and r.cfg.distill.steps > 0:  # (a resumed run makes the same start again)
            r.start_state = {k: p.detach().clone() for k, p in r.student.named_parameters() if p.requires_grad}
    return before, at_init, zeroed_before


VALIDATION_SEED = 3_000_003  # the sequences that judge a start against its training: not the reported held-out ones


def keep_better_start(r: Run, at_init: dict | None, after: dict) -> tuple[dict, dict | None]:
    """After distilling a warm start, compare the trained adapters with the start on separate
    validation sequences (as many as held out, at least 8, made after training so that the
    training is the same with or without this check); if the start is as close to the reference,
    put it back. Returns the held-out measure of the adapters kept and what the check saw."""
    if r.start_state is None or at_init is None:
        return after, None
    val = heldout(r.reference, r.tokenizer, train_synth_config(r.cfg), max(8, r.cfg.heldout_sequences),
                  progress=False, offset=VALIDATION_SEED)
    meter = KLMeter(r.reference, val, r.cfg.distill.eval_batch_size, r.cfg.distill)
    params = dict(r.student.named_parameters())
    trained = meter(r.student)
    trained_state = {k: params[k].detach().clone() for k in r.start_state}
    with torch.no_grad():
        for k, v in r.start_state.items():
            params[k].copy_(v)
    start = meter(r.student)
    kept = "warm start" if start["kl"] <= trained["kl"] else "trained"
    if kept == "trained":
        with torch.no_grad():
            for k, v in trained_state.items():
                params[k].copy_(v)
    else:
        log.warning("training took the %s start farther from the reference on %d validation sequences (KL %.4f "
                    "-> %.4f): keeping the start (held-out KL %.4f, not %.4f); a smaller --distill.lr may let "
                    "training improve on it", r.cfg.adapter.init, len(val), start["kl"], trained["kl"],
                    at_init["kl"], after["kl"])
    return (at_init if kept == "warm start" else after), {"sequences": len(val), "start": start,
                                                          "trained": trained, "kept": kept}


def _distill(r: Run, before: dict, at_init: dict | None):
    """Train by the method (its metrics streamed to metrics.jsonl / TensorBoard as they come:
    before, each step, after); returns (state, the method's summary or None, held-out after)."""
    t0 = time.perf_counter()
    metrics = MetricsLog(r.out / "metrics.jsonl", r.out / "tensorboard", enabled=r.rank == 0)
    if r.rank == 0 and not (r.out / "metrics.jsonl").exists():  # a fresh run (a resumed one has these lines)
        metrics.log("heldout", {"step": 0, "model": "degraded", **before})
        if at_init:
            metrics.log("heldout", {"step": 0, "model": "warm start", **at_init})
    try:
        state, summary = r.method.train(r, metrics)
        r.seconds["train"] = round(time.perf_counter() - t0, 2)
        after, r.start_check = keep_better_start(r, at_init, r.measure(r.student))
        kept_start = (r.start_check or {}).get("kept") == "warm start"
        metrics.log("heldout", {"step": state.step, "model": "warm start (kept)" if kept_start else "repaired",
                                "final": True, **after})
    finally:
        metrics.close()
    log.info("after: held-out KL %.4f, top-1 %.3f", after["kl"], after["top1"])
    return state, summary, after


def _save(r: Run, state, sft) -> tuple[Path, int, Path | None]:
    """The repair: a PEFT adapter (for a GGUF degraded model also a llama.cpp LoRA) or, for
    full-kd, the whole model. Returns (folder, tokens trained on, adapter.gguf or None)."""
    cfg, gguf_lora = r.cfg, None
    steps_tokens = state.step * cfg.distill.batch_size * cfg.distill.grad_accum * \
        (r.train_ids.shape[1] if r.train_ids is not None else 0)
    if not r.method.adapters:
        return save_model_dir(r.student, r.out / "model", r.tokenizer), steps_tokens, None
    r.student.save_pretrained(str(r.out / "adapter"))
    saved = r.out / "adapter"
    write_adapter_provenance(saved, r.student, reference=cfg.reference, degraded=_abs_spec(cfg.degraded),
                             degraded_fingerprint=r.identity["degraded_fingerprint"], zeroed_nonfinite=r.zeroed)
    if r.zeroed:  # llama.cpp would apply it to the GGUF's NaN/Inf weights as they are
        log.warning("no adapter.gguf: the degraded model's NaN/Inf weights were zeroed for training, and a "
                    "llama.cpp LoRA cannot zero them in the GGUF; export the merged model instead")
    else:
        gguf_lora = _gguf_lora(cfg.degraded, saved, r.out / "adapter.gguf")
    return saved, (sft["loss_tokens"] if sft else steps_tokens), gguf_lora


def _report(r: Run, state, sft, before, after, at_init, zeroed_before, sized) -> dict[str, Any]:
    """Write the repair and its report (plot, benchmarks, model cards, merged folder); return it."""
    cfg, out = r.cfg, r.out
    saved, tokens, gguf_lora = _save(r, state, sft)
    device = next(r.reference.parameters()).device
    train_s = r.seconds.get("train", 0.0)
    report: dict[str, Any] = {
        "reference": cfg.reference, "degraded": cfg.degraded, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "heldout": {"sequences": len(r.held_ids), "seq_len": r.held_ids.shape[1], "before": before, "after": after,
                    **({"init": at_init} if at_init else {}),
                    **({"before_zeroed_nonfinite": zeroed_before} if r.zeroed else {})},
        "zeroed_nonfinite": r.zeroed,
        "trainable_parameters": r.n_train, "processes": r.world,
        "adapter_modules": r.n_modules,
        "placement": ({"kind": "auto", "diagnosis": str(out / "diagnosis"), **r.plan.to_dict()}
                      if r.plan is not None and cfg.placement == "auto" else
                      {"kind": "preset", "modules": cfg.adapter.modules, "layers": cfg.adapter.layers,
                       "rank": cfg.adapter.rank}),
        "method": cfg.method, "init": cfg.adapter.init if r.method.adapters else None,
        "steps": state.step, "train_tokens": tokens, "step_mode": state.step_mode,
        **({"rewound_at": state.rewound_at} if state.rewound_at else {}),
        "synthetic_sequences": len(r.train_ids) if r.train_ids is not None else 0,
        "seconds": {"synthesize": r.seconds["synthesize"], "train": train_s},
        "train_tokens_per_second": round(tokens / train_s, 1) if train_s > 0 and state.step else None,
        "loss_curve": state.history, "heldout_curve": state.evals,
        "adapter": str(saved) if r.method.adapters else None,
        "model": str(saved) if not r.method.adapters else None, "config": cfg.to_dict(),
    }
    if sized:
        report["cost_estimate"] = sized
    if gguf_lora:
        report["gguf_lora"] = str(gguf_lora)
    if sft:
        report["sft"] = {k: v for k, v in sft.items() if k not in ("history", "config")}
    plot_training(state.history, state.evals, before, after, out / "loss.png", start=at_init,
                  kept_start=(r.start_check or {}).get("kept") == "warm start", rewound_at=state.rewound_at)
    if cfg.eval.tasks:  # before merging: the degraded model is the student with adapters disabled
        report["eval"] = evaluate_triplet(cfg, r.reference, r.student, r.tokenizer, out, r.progress, r.snapshot)
    report["command"] = command_line()
    if r.method.adapters:  # a base PEFT loads from anywhere, and a card instead of PEFT's template
        report["adapter_base"] = finish_adapter(saved, report, _abs_spec(cfg.degraded))
    else:
        write_merged_card(saved, report, _abs_spec(cfg.degraded))
    if cfg.merge and r.method.adapters:  # full-kd's out/model already is the whole model
        save_model_dir(r.student.merge_and_unload(), out / "merged", r.tokenizer)
        write_merged_card(out / "merged", report, _abs_spec(cfg.degraded))
        report["merged"] = str(out / "merged")
    return report


def plan_cost(cfg: RecoverConfig, reference: PreTrainedModel, device: torch.device, out: Path,
              speak: bool = True) -> dict | None:
    """On a CPU: size the run to ``cfg.time_budget`` (kept in ``out/budget.json``, so that a resumed
    run keeps the sizes it started with), or print what the run will cost before any work. A GPU
    keeps the configured, paper-sized run. Returns the sizing and estimate recorded in the report."""
    from . import budget

    if device.type != "cpu":
        if cfg.time_budget is not None:
            raise RecoverLoraError("--time-budget sizes CPU runs (its rates are a CPU's); on a GPU set --distill.steps")
        return None
    path = out / "budget.json"
    if cfg.time_budget is not None:
        old = json.loads(path.read_text()) if path.exists() else None
        if old and old.get("budget_s") == cfg.time_budget:
            cfg.distill.steps, cfg.distill.batch_size = old["steps"], old["batch_size"]
            cfg.synth.seq_len, cfg.distill.warmup_steps = old["seq_len"], old["warmup_steps"]
            cfg.synth.num_sequences = 0
            sized = old
        else:
            sized = budget.size_to_budget(cfg, reference, cfg.time_budget, getattr(cfg, "_explicit", set()))
            if speak:
                atomic_write_json(path, sized)
        if speak:
            print(f"recover: a {budget._hms(cfg.time_budget)} budget on this CPU: {sized['steps']} steps of "
                  f"{sized['batch_size']} x {sized['seq_len']} tokens, about {budget._hms(sized['estimate']['total_s'])} "
                  "(estimate; budget.json)", flush=True)
        return sized
    est = budget.estimate(cfg, reference)
    if speak:
        print(f"recover on a CPU: {budget.describe(cfg, est)}", flush=True)
    return {"estimate": est.to_dict()}


def _abs_spec(spec: str | None) -> str | None:
    """A local model path made absolute (so the record holds anywhere); names and hub ids as they are."""
    return str(Path(spec).resolve()) if spec and Path(spec).exists() else spec


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
    from .evaluate import evaluate, evaluate_reference
    from .evaluate.partial import partial_path, remove_partial
    from .report import build_report, compute_measures, measures_markdown

    ecfg = cfg.eval
    # resumable: each evaluation keeps its finished batches beside the file it will be written to
    part = {k: partial_path(out / "eval" / f"{k}.json") for k in ("reference", "degraded", "recovered")}
    # the reference runs once: its kept answers give the other two their answer-token KL
    ref_res, answers = evaluate_reference(reference, tokenizer, ecfg, progress=progress, resume=part["reference"])
    results = {"reference": ref_res}
    with degraded_view(student, snapshot):  # adapters off, or full-kd's pre-training weights
        results["degraded"] = evaluate(student, tokenizer, ecfg, progress=progress, reference=answers,
                                       name="degraded", resume=part["degraded"])
    results["recovered"] = evaluate(student, tokenizer, ecfg, progress=progress, reference=answers,
                                    name="repaired", resume=part["recovered"])
    for name, res in results.items():
        atomic_write_json(out / "eval" / f"{name}.json", res)
        remove_partial(part[name])
    rep = build_report(results["reference"], results["degraded"], results["recovered"], out / "eval")
    measures = {k: compute_measures(results["reference"], results[k]) for k in ("degraded", "recovered")}
    md = measures_markdown(measures, rep)
    atomic_write_json(out / "eval" / "measures.json", measures)
    return {**rep, "measures": measures, "markdown": md}
