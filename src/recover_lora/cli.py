"""``recover-lora``: a thin command line over the Python API (one subcommand per stage).

The flags are derived by tyro from the dataclasses in :mod:`recover_lora.commands` (which nest the
stage configs of :mod:`recover_lora.config`): ``recover-lora recover --distill.lr 5e-4``. Nothing
heavy is imported before a command runs, so ``--help`` answers at once.
"""

from __future__ import annotations

import logging
import sys
import warnings

from .errors import RecoverLoraError

USAGE = "usage: recover-lora [-v] COMMAND [FLAGS]   (recover-lora COMMAND --help: its flags)"


def _first_line(cls: type) -> str:
    return (cls.__doc__ or "").strip().split("\n")[0]


def _top_help() -> str:
    from .commands import COMMANDS

    width = max(map(len, COMMANDS))
    lines = [USAGE, "", "Repair damaged LLM weights with LoRA adapters distilled from the full-precision reference "
             "(Recover-LoRA).", "", "commands:"]
    lines += [f"  {name:<{width}}  {_first_line(cls)}" for name, cls in COMMANDS.items()]
    lines += ["", "  -v, --verbose  debug logging"]
    return "\n".join(lines)


def parse(argv: list[str]):
    """The command object of ``argv`` (``[COMMAND, FLAGS...]``), or an exit code for help/usage errors."""
    import tyro

    from .commands import COMMANDS, RecoverCmd, recover_default

    if not argv or argv[0] in ("-h", "--help"):
        print(_top_help())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"{USAGE}\nrecover-lora: error: unknown command {name!r}; commands: {', '.join(COMMANDS)}",
              file=sys.stderr)
        return 2
    cls = COMMANDS[name]
    default = recover_default(rest) if cls is RecoverCmd else None
    try:
        cmd = tyro.cli(cls, args=rest, prog=f"recover-lora {name}", default=default,
                       description=cls.__doc__)
    except SystemExit as e:  # --help, or a flag tyro refused (it printed why)
        return int(e.code or 0)
    if cls is RecoverCmd:  # shapes given on the command line: a --time-budget keeps them as they are
        cmd._explicit = {k for k, flag in (("batch_size", "--distill.batch-size"), ("seq_len", "--synth.seq-len"))
                         if any(a == flag or a.startswith(flag + "=") for a in rest)}
    return cmd


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = False
    while argv and argv[0] in ("-v", "--verbose"):
        verbose = True
        argv.pop(0)
    # Library chatter that says nothing about the user's run: peft asks transformers a deprecated
    # property on every training step, and looks for a hub config next to a local GGUF file.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*is deprecated")
    warnings.filterwarnings("ignore", message="Could not find a config file in")
    warnings.filterwarnings("ignore", message="Unable to fetch remote file")  # offline: same lookup
    try:
        cmd = parse(argv)
        if isinstance(cmd, int):
            return cmd
        logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                            format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
        return int(cmd.run() or 0)
    except RecoverLoraError as e:
        print(f"recover-lora: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("recover-lora: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
