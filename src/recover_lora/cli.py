"""``recover-lora``: a thin command line over the Python API (one subcommand per stage)."""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path

from .utils import RecoverLoraError


def _load_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("loading")
    g.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:1 ...")
    g.add_argument("--dtype", default=None, help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16")
    g.add_argument("--allow-pickle", action="store_true", default=None,
                   help="allow .bin/.pt pickle checkpoints (they can run code when loaded)")
    g.add_argument("--trust-remote-code", action="store_true", default=None)


def _synth_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("synthetic data")
    g.add_argument("--num-sequences", type=int, default=None)
    g.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (BOS included)")
    g.add_argument("--greedy-min", type=int, default=None)
    g.add_argument("--greedy-max", type=int, default=None)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--temperature-sample", dest="sample_temperature", type=float, default=None)
    g.add_argument("--synth-batch-size", type=int, default=None, help="sequences decoded at once (0 = auto)")
    g.add_argument("--add-bos", choices=["auto", "yes", "no"], default=None)
    g.add_argument("--seed", type=int, default=None)


def _override(obj, **kw):
    for k, v in kw.items():
        if v is not None:
            setattr(obj, k, v)
    return obj


def _apply_load(cfg, a) -> None:
    _override(cfg, device=a.device, dtype=a.dtype, allow_pickle=a.allow_pickle, trust_remote_code=a.trust_remote_code)


def _apply_synth(cfg, a) -> None:
    bos = {"auto": None, "yes": True, "no": False}.get(a.add_bos) if a.add_bos else "keep"
    _override(cfg, num_sequences=a.num_sequences, seq_len=a.seq_len, greedy_min=a.greedy_min,
              greedy_max=a.greedy_max, top_k=a.top_k, temperature=a.sample_temperature,
              batch_size=a.synth_batch_size, seed=a.seed)
    if bos != "keep":
        cfg.add_bos = bos


def cmd_synth(a: argparse.Namespace) -> int:
    from .load import LoadConfig, load_model, load_tokenizer
    from .synth import SynthConfig, synthesize

    lcfg = LoadConfig(dtype="auto")
    _apply_load(lcfg, a)
    scfg = SynthConfig()
    _apply_synth(scfg, a)
    model = load_model(a.reference, lcfg)
    tok = load_tokenizer(a.reference, lcfg)
    out = synthesize(model, tok, scfg, a.out)
    print(f"wrote {scfg.num_sequences} x {scfg.seq_len} tokens to {out}")
    return 0


def _recover_config(a: argparse.Namespace):
    from .recover import RecoverConfig

    cfg = RecoverConfig.from_yaml(a.config) if a.config else RecoverConfig()
    _override(cfg, reference=a.reference, degraded=a.degraded, out_dir=a.out, data=a.data,
              heldout_sequences=a.heldout, merge=a.merge, eval_data=a.eval_data, eval_limit=a.eval_limit,
              eval_backend=a.eval_backend,
              time_budget=getattr(a, "time_budget", None))
    # what a time budget must not resize: the shapes given on the command line
    cfg._explicit = {k for k, v in (("batch_size", a.batch_size), ("seq_len", a.seq_len)) if v is not None}
    if a.eval:
        cfg.eval_tasks = [t for t in a.eval.split(",") if t]
    _apply_load(cfg.load, a)
    _apply_synth(cfg.synth, a)
    _override(cfg, placement=a.placement, placement_budget=a.budget)
    _override(cfg.adapter, modules=a.modules, layers=a.layers, rank=a.rank, alpha=a.alpha, dropout=a.dropout,
              init=a.init)
    _override(cfg, method=a.method)
    _override(cfg.full_kd, lr=a.full_kd_lr)
    _override(cfg.sft, data_dir=a.sft_data, steps=a.sft_steps, epochs=a.sft_epochs, lr=a.sft_lr,
              batch_size=a.sft_batch_size)
    if a.sft_tasks:
        cfg.sft.tasks = [t for t in a.sft_tasks.split(",") if t]
    _override(cfg.distill, loss=a.loss, temperature=a.temperature, steps=a.steps, batch_size=a.batch_size,
              grad_accum=a.grad_accum, lr=a.lr, warmup_steps=a.warmup_steps, weight_decay=a.weight_decay,
              eval_every=a.eval_every, checkpoint_every=a.checkpoint_every, seed=a.seed,
              cuda_graph=a.cuda_graph, activation_checkpointing=a.activation_checkpointing, fsdp=a.fsdp,
              teacher_topk=a.teacher_topk, hidden_weight=a.hidden_weight)
    return cfg


def cmd_recover(a: argparse.Namespace) -> int:
    from .recover import recover

    cfg = _recover_config(a)
    if a.print_config:
        import yaml
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        return 0
    rep = recover(cfg)
    if rep.get("rank", 0) != 0:  # under torchrun, rank 0 reports
        return 0
    b, f = rep["heldout"]["before"], rep["heldout"]["after"]
    print(f"\nheld-out KL {b['kl']:.4f} -> {f['kl']:.4f}; top-1 agreement {100 * b['top1']:.1f}% -> "
          f"{100 * f['top1']:.1f}%  ({rep['trainable_parameters']:,} trainable parameters, "
          f"{rep['train_tokens']:,} tokens)")
    if "eval" in rep:
        print(rep["eval"].get("markdown", ""))
    print(f"{'model' if rep.get('model') else 'adapter'}: {rep.get('model') or rep['adapter']}\nreport: {Path(cfg.out_dir) / 'report.json'}, plot: {Path(cfg.out_dir) / 'loss.png'}")
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from .demo import DemoConfig, run_demo

    cfg = DemoConfig()
    _override(cfg, out_dir=a.out, eval_data=a.eval_data, eval_limit=a.eval_limit, steps=a.steps, device=a.device,
              model=a.model)
    run_demo(cfg)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import bench, degrade, diagnose, export, study
    from .evaluate import cli as eval_cli

    p = argparse.ArgumentParser(prog="recover-lora",
                                description="Repair damaged LLM weights with LoRA adapters distilled from the "
                                            "full-precision reference (Recover-LoRA).")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    degrade.register(sub)
    diagnose.register(sub)

    s = sub.add_parser("synth", help="hybrid-sampled synthetic data from the reference (resumable)")
    s.add_argument("--reference", required=True, help="model spec: smollm2, folder, .gguf, hub id")
    s.add_argument("--out", required=True, help="output folder (shards + manifest.json)")
    _synth_options(s)
    _load_options(s)
    s.set_defaults(func=cmd_synth)

    r = sub.add_parser("recover", help="the main job: distill the reference into LoRA adapters on the degraded model")
    r.add_argument("--reference", default=None, help="reference model spec (default: smollm2)")
    r.add_argument("--degraded", default=None, help="degraded model spec (folder, .gguf, .safetensors state dict...)")
    r.add_argument("--out", default=None, help="output folder (default runs/recover)")
    r.add_argument("--config", default=None, help="YAML with RecoverConfig fields; flags override it")
    r.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    r.add_argument("--time-budget", default=None, metavar="DURATION",
                   help="on a CPU: size the steps (and batch and length, unless given) so the run fits, e.g. 15m, "
                        "1h, 900 (without it a CPU run prints its estimated cost before starting)")
    r.add_argument("--data", default=None, help="existing synthetic data folder (default: generate into OUT/synth)")
    r.add_argument("--heldout", type=int, default=None, help="held-out synthetic sequences for KL/top-1")
    r.add_argument("--merge", action="store_true", default=None, help="also write OUT/merged")
    r.add_argument("--eval", default=None, help="benchmarks to run at the end, e.g. arc_easy,piqa or all")
    r.add_argument("--eval-data", default=None, help="folder of benchmark JSONL files")
    r.add_argument("--eval-limit", type=int, default=None)
    r.add_argument("--eval-backend", default=None, choices=["builtin", "lm-eval"],
                   help="who scores --eval: this package (default) or lm-evaluation-harness itself "
                        "(pip install 'recover-lora[lmeval]'; local files from --eval-data)")
    g = r.add_argument_group("adapters")
    g.add_argument("--modules", default=None, help="kv | attn | mlp | attn-mlp | all-linear | q_proj,v_proj | re:REGEX")
    g.add_argument("--layers", default=None, help="layer subset, e.g. 0-11,20")
    g.add_argument("--rank", type=int, default=None)
    g.add_argument("--alpha", type=float, default=None)
    g.add_argument("--dropout", type=float, default=None)
    g.add_argument("--init", default=None,
                   help="default | gaussian | pissa | olora (PEFT's) | svd | eora | eora-diag (the best rank-r "
                        "fix of W_ref - W_deg: of the weights, of the layer outputs on synthetic inputs, or "
                        "weighted by input scale; with --steps 0: training-free compensation)")
    r.add_argument("--method", choices=["recover-lora", "full-kd", "sft-lora"], default=None,
                   help="recover-lora (default); full-kd: distill into all weights (LLM-QAT*); "
                        "sft-lora: supervised LoRA on the train splits of --sft-tasks")
    g = r.add_argument_group("baselines")
    g.add_argument("--full-kd-lr", type=float, default=None, help="learning rate of full-kd (default 2e-5)")
    g.add_argument("--sft-tasks", default=None,
                   help="tasks whose train split sft-lora trains on (default arc_easy,arc_challenge,openbookqa,piqa)")
    g.add_argument("--sft-data", default=None, help="folder with <task>/train.jsonl (default: --eval-data)")
    g.add_argument("--sft-steps", type=int, default=None, help="0 = --sft-epochs passes over the examples")
    g.add_argument("--sft-epochs", type=int, default=None)
    g.add_argument("--sft-lr", type=float, default=None, help="default 2e-4")
    g.add_argument("--sft-batch-size", type=int, default=None)
    g.add_argument("--placement", choices=["preset", "auto"], default=None,
                   help="preset: --modules/--layers/--rank; auto: diagnose the damage, then choose modules, layers "
                        "and per-module ranks within --budget (writes OUT/diagnosis)")
    g.add_argument("--budget", type=int, default=None,
                   help="auto placement: trainable-parameter budget (default: attn-mlp at --rank on all layers)")
    g = r.add_argument_group("distillation")
    g.add_argument("--loss", choices=["kl", "reverse_kl", "jsd"], default=None)
    g.add_argument("--temperature", type=float, default=None)
    g.add_argument("--steps", type=int, default=None)
    g.add_argument("--batch-size", type=int, default=None)
    g.add_argument("--grad-accum", type=int, default=None)
    g.add_argument("--lr", type=float, default=None)
    g.add_argument("--warmup-steps", type=int, default=None)
    g.add_argument("--weight-decay", type=float, default=None)
    g.add_argument("--eval-every", type=int, default=None)
    g.add_argument("--checkpoint-every", type=int, default=None)
    g.add_argument("--cuda-graph", choices=["auto", "on", "off"], default=None,
                   help="replay each training step as one CUDA graph (auto: on a single GPU, eager if the "
                        "capture fails or disagrees with the eager step)")
    g.add_argument("--teacher-topk", type=int, default=None,
                   help="distill from the teacher's top-k tokens per position only (forward KL; 0 = all)")
    g.add_argument("--hidden-weight", type=float, default=None,
                   help="also match each intermediate layer's output to the reference's, with this weight (0 = off)")
    g.add_argument("--fsdp", action="store_true", default=None,
                   help="under torchrun / accelerate launch: shard the decoder layers of both models across the "
                        "ranks (FSDP2) instead of replicating the student under DDP")
    g.add_argument("--activation-checkpointing", action="store_true", default=None,
                   help="recompute decoder layers in the backward: far less memory, one more student forward")
    _synth_options(r)
    _load_options(r)
    r.set_defaults(func=cmd_recover)

    eval_cli.register(sub)
    export.register(sub)
    bench.register(sub)
    study.register(sub)

    d = sub.add_parser("demo", help="offline end-to-end demo on the embedded SmolLM2-135M")
    d.add_argument("--out", default=None, help="output folder (default runs/demo)")
    d.add_argument("--model", default=None, help="embedded model (default smollm2)")
    d.add_argument("--eval-data", default=None, help="benchmark folder: adds ARC-Easy and PIQA accuracy")
    d.add_argument("--eval-limit", type=int, default=None, help="items per task (default 100 on CPU, all on GPU)")
    d.add_argument("--steps", type=int, default=None)
    d.add_argument("--device", default=None)
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    # Library chatter that says nothing about the user's run: peft asks transformers a deprecated
    # property on every training step, and looks for a hub config next to a local GGUF file.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*is deprecated")
    warnings.filterwarnings("ignore", message="Could not find a config file in")
    warnings.filterwarnings("ignore", message="Unable to fetch remote file")  # offline: same lookup
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        return int(args.func(args) or 0)
    except RecoverLoraError as e:
        print(f"recover-lora: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("recover-lora: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
