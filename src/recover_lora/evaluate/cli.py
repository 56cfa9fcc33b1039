"""``recover-lora eval`` and ``recover-lora report`` (their flags: ``commands.EvalCmd`` / ``ReportCmd``)."""

from __future__ import annotations

import copy
from pathlib import Path

from ..utils import RecoverLoraError, atomic_write_json, log


def _load(model_spec: str, adapter: str | None, cmd, tokenizer_spec: str | None = None):
    from ..load import load_model, load_tokenizer  # noqa: PLC0415

    model = load_model(model_spec, cmd.load)
    if adapter:
        if not Path(adapter).exists():
            raise RecoverLoraError(f"adapter {adapter} does not exist")
        from ..provenance import apply_adapter  # noqa: PLC0415
        model = apply_adapter(model, adapter)
    tok = load_tokenizer(tokenizer_spec or model_spec, cmd.load)
    return model, tok


def run_eval(model_spec: str, adapter: str | None, cmd, tokenizer_spec: str | None = None,
             resume: Path | None = None) -> dict:
    """Load a model (plus optional adapter) and evaluate it on ``cmd.eval``; the JSON-ready document.
    ``resume``: keep finished batches there, and take up an interrupted evaluation from them."""
    from . import evaluate  # noqa: PLC0415
    from .runner import build_requests, config_dict  # noqa: PLC0415

    cfg = copy.copy(cmd.eval)
    if cfg.limit is not None and cfg.limit <= 0:
        raise RecoverLoraError("--eval.limit must be positive")
    build_requests(cfg)  # fail fast on a bad task name / data file before loading the model
    model, tok = _load(model_spec, adapter, cmd, tokenizer_spec)
    results = evaluate(model, tok, cfg, progress=cmd.progress,
                       name=Path(model_spec).name + (f" + {Path(adapter).name}" if adapter else ""), resume=resume)
    return {"model": model_spec, "adapter": adapter, "config": config_dict(cfg), "results": results}


def summary_table(results: dict) -> str:
    lines = ["| task | n | acc | acc_norm |", "|---|---:|---:|---:|"]
    for t, r in results.items():
        an = f"{100 * r['acc_norm']:.2f}" if "acc_norm" in r else "-"
        lines.append(f"| {t} | {r['n']} | {100 * r['acc']:.2f} | {an} |")
    return "\n".join(lines)


def cmd_eval(cmd) -> int:
    from .partial import partial_path, remove_partial  # noqa: PLC0415

    # with an output file an interrupted evaluation resumes: the same command scores only the rest
    part = partial_path(cmd.out_file) if cmd.out_file else None
    doc = run_eval(cmd.model, cmd.adapter, cmd, cmd.tokenizer, resume=part)
    print(summary_table(doc["results"]))
    if cmd.out_file:
        atomic_write_json(cmd.out_file, doc)
        remove_partial(part)
        print(f"wrote {cmd.out_file}")
    return 0


def cmd_report(cmd) -> int:
    from ..report import build_report  # noqa: PLC0415
    from .lmeval_backend import read_results  # noqa: PLC0415
    from .partial import partial_path, remove_partial  # noqa: PLC0415

    out = Path(cmd.out_dir)
    docs = {}
    for role, spec, adapter, path in (("reference", cmd.reference, None, cmd.reference_results),
                                      ("degraded", cmd.degraded, None, cmd.degraded_results),
                                      ("recovered", cmd.recovered or cmd.degraded, cmd.adapter,
                                       cmd.recovered_results)):
        if path:
            if not Path(path).exists():
                raise RecoverLoraError(f"{role} results file {path} not found")
            docs[role] = read_results(path)  # ours, or lm-eval's results_*.json (or its output folder)
            continue
        if not spec or (role == "recovered" and not (cmd.adapter or cmd.recovered)):
            raise RecoverLoraError(f"report needs --{role}-results or a model for the {role} side "
                                   f"({'--adapter' if role == 'recovered' else '--' + role})")
        log.info("evaluating the %s model", role)
        docs[role] = run_eval(spec, adapter, cmd, tokenizer_spec=cmd.reference or spec,
                              resume=partial_path(out / f"{role}.json"))
        atomic_write_json(out / f"{role}.json", docs[role])
        remove_partial(partial_path(out / f"{role}.json"))
    rep = build_report(docs["reference"], docs["degraded"], docs["recovered"], out, cmd.report)
    print(rep["markdown"])
    print(f"wrote {rep['files']['markdown']}, {rep['files']['json']}, {rep['files']['png']}")
    return 0
