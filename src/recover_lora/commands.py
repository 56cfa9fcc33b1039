"""The command line's schema: one dataclass per subcommand, its flags derived by tyro.

Every flag is a field: its type, default and help (the comment beside it) come from here or from
the stage configs in :mod:`recover_lora.config` it nests, so a flag means the same thing in every
subcommand: ``--out-dir`` is always a folder, ``--eval.data-dir`` the benchmark folder,
``--load.device`` where models go, ``--distill.lr`` the learning rate. ``recover --config run.yaml``
reads a RecoverConfig YAML (typed: ``lr: 1e-3`` is the float it means) and flags override it.
Nothing here imports torch (``--help`` answers at once); ``run()`` imports the stage it calls.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from .config import (BenchConfig, DemoConfig, DiagnoseConfig, EvalConfig, LoadConfig, RecoverConfig, ReportConfig,
                     SynthConfig)
from .errors import RecoverLoraError

@dataclass
class SynthCmd:
    """Hybrid-sampled synthetic data from the reference (resumable)."""

    reference: str = "smollm2"  # model spec: smollm2, gemma3-270m, folder, .gguf, hub id
    out_dir: str = "runs/synth"  # output folder (shards + manifest.json)
    synth: SynthConfig = field(default_factory=SynthConfig)  # --synth.num-sequences is required here
    load: LoadConfig = field(default_factory=lambda: LoadConfig(dtype="auto"))

    def run(self) -> int:
        from .load import load_model, load_tokenizer
        from .synth import synthesize

        model, tok = load_model(self.reference, self.load), load_tokenizer(self.reference, self.load)
        out = synthesize(model, tok, self.synth, self.out_dir)
        print(f"wrote {self.synth.num_sequences} x {self.synth.seq_len} tokens to {out}")
        return 0


@dataclass
class DegradeCmd:
    """Seeded, reproducible weight damage: an HF model folder + damage.json.

    Damage specs: noise:rel=0.1 | rtn:bits=3,group=128[,asym] | dtype:fp16|bf16|fp8[,scale=tensor] |
    bitflip:n=10[,bits=all|sign|exponent|mantissa] or rate=1e-6 | prune:sparsity=0.5 | prune:nm=2:4 |
    gguf:Q4_0 (llama.cpp's quantizers); each may add modules=PRESET|suffix+suffix|re:REGEX and
    layers=0-5,10.
    """

    model: str  # model spec: HF folder, .gguf, hub id or embedded name (smollm2)
    out_dir: str  # output folder (written atomically)
    damage: list[str]  # damage op specs, applied in order (or joined with ';')
    seed: int = 0  # of the random damages (noise, bitflip): the same seed, the same damage
    modules: str = "all-linear"  # default targets: a preset, suffixes joined by '+' or ',', or re:REGEX
    layers: str | None = None  # default layer subset, e.g. 0-5,10 (inclusive)
    include_embeddings: bool = False  # let ops damage the (often tied) embedding / lm_head
    overwrite: bool = False  # replace --out-dir if it exists
    load: LoadConfig = field(default_factory=LoadConfig)  # dtype: what the model is loaded (and saved) in

    def run(self) -> int:
        from .degrade import run_cli

        return run_cli(self)


@dataclass
class DiagnoseCmd:
    """Per-layer/module weight and functional damage, and a recommended adapter placement."""

    reference: str  # reference model spec (folder, .gguf, hub id, smollm2)
    degraded: str  # degraded model spec
    out_dir: str  # output folder (diagnosis.json/.md/.png, plan.json)
    diagnose: DiagnoseConfig = field(default_factory=lambda: DiagnoseConfig(seq_len=0))
    load: LoadConfig = field(default_factory=LoadConfig)  # float32 default: small damage stays visible

    def run(self) -> int:
        from .placement import diagnose_cli

        return diagnose_cli(self)


@dataclass
class RecoverCmd(RecoverConfig):
    """The main job: distill the reference into LoRA adapters on the degraded model.

    On a CPU it prints its estimated cost first; --time-budget 15m sizes it to fit instead.
    """

    config: str | None = None  # YAML with RecoverConfig fields; flags override it
    print_config: bool = False  # print the resolved config (YAML) and exit

    def recover_config(self) -> RecoverConfig:
        return RecoverConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(RecoverConfig)})

    def run(self) -> int:
        cfg = self.recover_config()
        cfg._explicit = getattr(self, "_explicit", set())  # shapes a --time-budget must not resize
        if self.print_config:
            import yaml

            print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            return 0
        from .recover import recover

        rep = recover(cfg)
        if rep.get("rank", 0) != 0:  # under torchrun, rank 0 reports
            return 0
        b, f = rep["heldout"]["before"], rep["heldout"]["after"]
        print(f"\nheld-out KL {b['kl']:.4f} -> {f['kl']:.4f}; top-1 agreement {100 * b['top1']:.1f}% -> "
              f"{100 * f['top1']:.1f}%  ({rep['trainable_parameters']:,} trainable parameters, "
              f"{rep['train_tokens']:,} tokens)")
        if "eval" in rep:
            print(rep["eval"].get("markdown", ""))
        out = Path(cfg.out_dir)
        print(f"{'model' if rep.get('model') else 'adapter'}: {rep.get('model') or rep['adapter']}\n"
              f"report: {out / 'report.json'}, metrics: {out / 'metrics.jsonl'}, plot: {out / 'loss.png'}")
        return 0


@dataclass
class EvalCmd:
    """Score a model (optionally with a LoRA adapter) on benchmarks, as lm-evaluation-harness 0.4 does."""

    model: str  # model spec: smollm2, embedded:NAME, folder, .gguf, hub id
    adapter: str | None = None  # PEFT adapter folder applied on top of --model
    tokenizer: str | None = None  # tokenizer spec (None: --model's)
    out_file: str | None = None  # write the results JSON here
    eval: EvalConfig = field(default_factory=EvalConfig)
    load: LoadConfig = field(default_factory=lambda: LoadConfig(dtype="auto"))
    progress: bool = True  # progress bars

    def run(self) -> int:
        from .evaluate.cli import cmd_eval

        return cmd_eval(self)


@dataclass
class ReportCmd:
    """Reference vs degraded vs recovered: accuracy, drop, gap closed, paired bootstrap CIs.

    Each side is a model to evaluate, or earlier results: `eval --out-file` JSON, or lm-eval's
    results_*.json (or its --output_path folder; per item with --log_samples).
    """

    reference: str | None = None  # reference model spec
    degraded: str | None = None  # degraded model spec
    adapter: str | None = None  # recovery adapter (recovered = degraded + adapter)
    recovered: str | None = None  # recovered model spec (None: --degraded with --adapter)
    reference_results: str | None = None  # earlier results of the reference (ours or lm-eval's)
    degraded_results: str | None = None  # the same for the degraded model
    recovered_results: str | None = None  # the same for the recovered model
    out_dir: str = "report"  # where report.md/json/png go
    report: ReportConfig = field(default_factory=ReportConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    load: LoadConfig = field(default_factory=lambda: LoadConfig(dtype="auto"))
    progress: bool = True

    def run(self) -> int:
        from .evaluate.cli import cmd_report

        return cmd_report(self)


@dataclass
class ExportCmd:
    """Merge a recovery adapter into the degraded model, or write it as a llama.cpp GGUF LoRA.

    Merged: a safetensors folder with a model card. GGUF: a LoRA file for the degraded GGUF
    (llama-cli -m D.gguf --lora FILE)."""

    degraded: str  # degraded model spec (for --gguf-lora: its .gguf file)
    adapter: str  # adapter folder written by `recover`
    out_dir: str | None = None  # merged output folder
    gguf_lora: str | None = None  # write a llama.cpp LoRA adapter file here
    gguf_dtype: str = "f32"  # f32 | f16: the GGUF LoRA's tensors
    dtype: str = "float32"  # float32 | bfloat16 | float16: the merged folder's weights
    reference: str | None = None  # reference spec (tokenizer; config for bare state dicts)
    load: LoadConfig = field(default_factory=lambda: LoadConfig(dtype="float32", device="cpu"))

    def run(self) -> int:
        from .export import run_cli

        return run_cli(self)


@dataclass
class BenchCmd(BenchConfig):
    """Naive vs optimized synthesis and distillation throughput, CPU paths, evaluation speed (JSON)."""

    table: list[str] | None = None  # print the markdown table and goal checks of earlier bench JSON files

    def run(self) -> int:
        from recover_lora_bench import cmd_bench  # the bench is a package beside the library

        return cmd_bench(self)


@dataclass
class StudyEval:
    data_dir: str | None = None  # benchmark folder instead of the config's eval.data_dir


@dataclass
class StudyCmd:
    """The study: models x damages x methods from a YAML file, resumable, summarised in RESULTS.md."""

    config: str | None = None  # study YAML (see study.yaml, study-cpu.yaml)
    only: list[str] | None = None  # run only matching runs: MODEL[/DAMAGE[/METHOD]] globs
    skip: list[str] | None = None  # leave out matching runs (same globs), e.g. '*/*/*@100k' in a short lease
    again: list[str] | None = None  # finished runs to run again from their start (earlier results kept in earlier/K/)
    dry_run: bool = False  # print the plan (done / started / to do) and exit
    jobs: int = 1  # runs side by side in worker processes sharing this machine's device
    stop_after: float | None = None  # seconds: start no run after this (a device lease)
    results_only: bool = False  # only rewrite RESULTS.md from finished runs
    results: str | None = None  # RESULTS.md path (None: the config's `results`)
    eval: StudyEval = field(default_factory=StudyEval)
    pack: str | None = None  # after the runs, pack the small result files into this .tar.gz
    unpack: str | None = None  # merge a --pack archive into the study folder, rewrite RESULTS.md, exit
    worker: str | None = None  # internal: STUDY_DIR, one worker process of --jobs

    def run(self) -> int:
        from .study import run_cli

        return run_cli(self)


@dataclass
class DemoCmd(DemoConfig):
    """Offline end-to-end demo on the embedded SmolLM2-135M (well under 15 minutes on 2 CPU cores)."""

    def run(self) -> int:
        from .demo import run_demo

        run_demo(DemoConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(DemoConfig)}))
        return 0


COMMANDS: dict[str, type] = {"degrade": DegradeCmd, "diagnose": DiagnoseCmd, "synth": SynthCmd, "recover": RecoverCmd,
                             "eval": EvalCmd, "report": ReportCmd, "export": ExportCmd, "bench": BenchCmd,
                             "study": StudyCmd, "demo": DemoCmd}


def recover_default(argv: list[str]) -> RecoverCmd:
    """``recover``'s defaults: the ``--config`` YAML's fields where one is given (flags override them)."""
    path = None
    for i, a in enumerate(argv):
        if a == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
        elif a.startswith("--config="):
            path = a.split("=", 1)[1]
    if path is None:
        return RecoverCmd()
    if not Path(path).is_file():
        raise RecoverLoraError(f"--config {path}: no such file")
    cfg = RecoverConfig.from_yaml(path)
    return RecoverCmd(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(RecoverConfig)}, config=path)
