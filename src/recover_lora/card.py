"""What travels with a repair: a base path PEFT can load from anywhere, and a model card.

PEFT writes ``adapter_config.json`` with the base model as the model's ``_name_or_path`` (a path
relative to where the run started, or the reference's cache folder for a model damaged in memory),
and a README that is its empty template. :func:`finish_adapter` points the adapter at a base that
``AutoPeftModelForCausalLM`` loads from any working directory (an absolute folder; a GGUF's
converted safetensors folder; a hub id as it is) and writes the card: what was repaired, with
what, and what it measured before and after.
"""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path
from typing import Any

from .utils import atomic_write_bytes, atomic_write_json, read_json

IN_MEMORY = "(a model damaged in memory: put this adapter on it with PeftModel.from_pretrained(model, folder))"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def loadable_base(spec: str | None) -> str | None:
    """The base ``from_pretrained`` can load for ``spec``: an absolute model folder (a GGUF file or
    embedded name: its converted folder, once loaded), a hub id as it is; None when there is none
    (a bare state dict, a model damaged in memory)."""
    from .load import gguf_converted_dir, resolve_spec  # noqa: PLC0415

    if not spec:
        return None
    spec = resolve_spec(spec)  # an embedded model's name: its GGUF file
    p = Path(spec).expanduser()
    if p.is_dir() and (p / "config.json").exists():
        return str(p.resolve())
    if p.is_file() and p.suffix.lower() == ".gguf":
        conv = gguf_converted_dir(p.resolve())
        return str(conv) if conv is not None and (conv / "DONE").exists() else None
    if not p.exists() and HUB_ID.match(spec):
        return spec
    return None


def command_line() -> str:
    """How this process was started, as a shell line (``recover-lora ...`` from the CLI)."""
    argv = list(sys.argv)
    if argv and Path(argv[0]).name in ("recover-lora", "cli.py", "__main__.py"):
        argv[0] = "recover-lora"
    return " ".join(shlex.quote(a) for a in argv)


def _fmt(x: Any, pct: bool = False) -> str:
    if x is None:
        return "n/a"
    return f"{100 * x:.1f}" if pct else f"{x:.4f}"


def card_text(report: dict[str, Any], kind: str, base: str | None, degraded: str | None) -> str:
    """The model card (front matter the hub reads, then what a reader needs) of an adapter or merged model."""
    h = report.get("heldout", {})
    before, after = h.get("before", {}), h.get("after", {})
    lines = ["---", "library_name: " + ("peft" if kind == "adapter" else "transformers")]
    if base:
        lines.append(f"base_model: {base}")
    lines += ["tags:", "- recover-lora", "- lora" if kind == "adapter" else "- merged-lora", "---", ""]
    what = "LoRA adapter" if kind == "adapter" else "Repaired model (the LoRA adapter merged into the damaged weights)"
    lines += [f"# {what} made by recover-lora", "",
              f"Repairs **{degraded or 'a damaged model'}** toward its full-precision reference "
              f"**{report.get('reference')}** by distilling the reference's logits on synthetic text "
              "(Recover-LoRA, arXiv 2510.08600).", "",
              "| | damaged | repaired |", "|---|---|---|",
              f"| held-out KL to the reference (nats/token) | {_fmt(before.get('kl'))} | {_fmt(after.get('kl'))} |",
              f"| held-out top-1 agreement (%) | {_fmt(before.get('top1'), True)} | {_fmt(after.get('top1'), True)} |"]
    for task, r in (report.get("eval", {}).get("tasks") or {}).items():  # report.compute_report's rows, in %
        lines.append(f"| {task} {r.get('metric', 'acc')} (%; reference {r['reference']:.1f}, {r.get('n')} items) | "
                     f"{r['degraded']:.1f} | {r['recovered']:.1f} |")
    plc = report.get("placement", {})
    lines += ["", f"- method: {report.get('method')}, placement: {plc.get('kind')}, init: {report.get('init')}, "
              f"{report.get('trainable_parameters', 0):,} trainable parameters",
              f"- training: {report.get('steps')} steps, {report.get('train_tokens', 0):,} tokens "
              f"({report.get('synthetic_sequences', 0):,} synthetic sequences), on {report.get('device_name')}",
              f"- command: `{report.get('command') or command_line()}`", ""]
    if kind == "adapter":
        lines += ["## Use", "", "```python", "from peft import AutoPeftModelForCausalLM",
                  f"model = AutoPeftModelForCausalLM.from_pretrained({'<this folder>'!r})  # loads {base or 'the damaged model'}",
                  "```", "", "or `recover-lora export --degraded DAMAGED --adapter <this folder> --out-dir merged/`. "
                  "`recover_lora.json` beside it records the damaged model it fits (checked when applied).", ""]
    return "\n".join(lines)


def finish_adapter(adapter_dir: str | Path, report: dict[str, Any], degraded: str | None) -> str | None:
    """Point ``adapter_config.json`` at a loadable base and write the adapter's model card. Returns the base."""
    adapter_dir = Path(adapter_dir)
    base = loadable_base(degraded)
    cfg_path = adapter_dir / "adapter_config.json"
    cfg = read_json(cfg_path)
    # no loadable base: keep the spec, so that a loader fails naming it rather than loading another model
    cfg["base_model_name_or_path"] = base or degraded or IN_MEMORY
    atomic_write_json(cfg_path, cfg)
    atomic_write_bytes(adapter_dir / "README.md", card_text(report, "adapter", base, degraded).encode())
    return base


def write_merged_card(folder: str | Path, report: dict[str, Any], degraded: str | None) -> None:
    atomic_write_bytes(Path(folder) / "README.md",
                       card_text(report, "merged", loadable_base(degraded), degraded).encode())
