"""What ``study.yaml`` holds (:class:`StudyConfig`), the configs it gives a run, and the runs it plans."""

from __future__ import annotations

import copy
import fnmatch
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from ..config import EvalConfig, RecoverConfig
from ..evaluate.tasks import DEFAULT_TASKS  # the seven benchmarks, MMLU as its three subjects
from ..utils import RecoverLoraError, read_json

_AUTOCAST = {"bf16": "bf16", "fp32": "off"}  # a study's precision -> the autocast setting it means
# ... and the dtype its synthetic data is decoded in ("auto" would decode in bf16 on a CPU that has bf16
# matmuls and in fp32 on one without: a model's data would change with the machine a session gets)
_SYNTH_DTYPE = {"bf16": "bfloat16", "fp32": "float32"}
FAILED = "failed.json"  # in a run folder whose last attempt raised: the error, tried again next time


# what a study's ``eval:`` may set (answer_kl: keep the reference's answers for the answer-token KL)
EVAL_KEYS = {"tasks", "data_dir", "limit", "autocast", "answer_kl", "max_batch_tokens"}


@dataclass
class StudyConfig:
    """What ``study.yaml`` holds (see the file at the repository root)."""

    study_dir: str = "runs/study"
    results: str = "RESULTS.md"
    models: dict[str, str] = field(default_factory=dict)  # name -> spec (zoo name, folder, mha:SPEC)
    damages: dict[str, list] = field(default_factory=dict)  # name -> ops ("noise:rel=0.1" or dicts)
    # model -> {damage: ops}: the same kind of damage at a strength that harms that model comparably
    # (a 0.5B model shrugs off noise that cripples a 135M one, and a gap of one point measures nothing)
    damage_overrides: dict[str, dict[str, list]] = field(default_factory=dict)
    damage_seed: int = 0
    # model -> "bf16" | "fp32": the matmul precision of that model's training and scoring (overrides
    # recover's and eval's autocast), so that a model whose runs start on a CPU without bf16 matmuls
    # runs in fp32 throughout while the models finished in bf16 stay comparable within themselves
    precision: dict[str, str] = field(default_factory=dict)
    recover: dict[str, Any] = field(default_factory=dict)  # RecoverConfig fields common to every run
    eval: dict[str, Any] = field(default_factory=lambda: {"tasks": list(DEFAULT_TASKS), "data_dir": None,
                                                          "limit": None})
    methods: dict[str, dict] = field(default_factory=dict)  # name -> RecoverConfig overrides
    sweep: dict[str, Any] | None = None  # {method, sequences: [1000, ...], steps: one-pass | N}
    # model -> {damages: [...], methods: [...]} or a list of such blocks: the runs of that model
    # (default: every damage x method); with a plan, only the models it names run
    plan: dict[str, Any] = field(default_factory=dict)
    # {limit: 500, methods: [...]}: accuracy on more items for the reference, the degraded model and
    # these methods (the measures of every run, ``eval``, use fewer items: agreement and answer KL
    # resolve a repair on 200 items a task, accuracy does not)
    accuracy: dict[str, Any] | None = None
    mirror: str | None = None  # folder the small result files are copied to as each run finishes
    notes: str | None = None  # a hand-written Markdown file put into RESULTS.md after the goals (where, why)
    # another study's config (the GPU study beside the CPU one): its finished runs of the same model,
    # damage and method are put beside this study's in one table of RESULTS.md (read from its mirror)
    beside: str | None = None
    goals: dict[str, Any] = field(default_factory=lambda: {
        "method": "auto+svd", "presets": ["kv", "attn-mlp"], "baselines": ["full-kd", "svd-only"],
        "min_gap_closed": 0.9})

    @classmethod
    def from_yaml(cls, path: str | Path) -> "StudyConfig":
        path = Path(path)
        try:
            d = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise RecoverLoraError(f"cannot read study config {path}: {e}") from None
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise RecoverLoraError(f"unknown study keys {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}")
        cfg = cls(**d)
        for m, over in cfg.damage_overrides.items():
            if m not in cfg.models or not set(over or {}) <= set(cfg.damages):
                raise RecoverLoraError(f"damage_overrides[{m!r}]: models are {list(cfg.models)}, damages "
                                       f"{list(cfg.damages)}; it names {m!r}: {list(over or {})}")
        for m, p in cfg.precision.items():
            if m not in cfg.models or p not in _AUTOCAST:
                raise RecoverLoraError(f"precision[{m!r}] = {p!r}: models are {list(cfg.models)}, precisions "
                                       f"{list(_AUTOCAST)}")
        base = path.resolve().parent  # relative paths are relative to the YAML file
        cfg.study_dir = str(base / cfg.study_dir)
        cfg.results = str(base / cfg.results)
        for m in cfg.plan:
            methods = set(cfg.all_methods())
            for sel in cfg.plan_blocks(m):
                if m not in cfg.models or not set(sel.get("damages") or []) <= set(cfg.damages) \
                        or not set(sel.get("methods") or []) <= methods or set(sel) - {"damages", "methods"}:
                    raise RecoverLoraError(f"plan[{m!r}]: models are {list(cfg.models)}, damages {list(cfg.damages)}, "
                                           f"methods {sorted(methods)}; it has {sel}")
        if cfg.accuracy and not set(cfg.accuracy.get("methods", [])) <= set(cfg.all_methods()):
            raise RecoverLoraError(f"accuracy.methods {cfg.accuracy.get('methods')}: not all in {list(cfg.all_methods())}")
        if cfg.mirror:
            cfg.mirror = str(base / cfg.mirror)
            s, m = Path(cfg.study_dir).resolve(), Path(cfg.mirror).resolve()
            if s != m and (s in m.parents or m in s.parents):  # each mirroring would copy one into itself
                raise RecoverLoraError(f"study_dir {s} and mirror {m}: one is inside the other; put them side by "
                                       "side (or make them one folder)")
        if cfg.notes:
            cfg.notes = str(base / cfg.notes)
        if cfg.beside:
            cfg.beside = str(base / cfg.beside)
        cfg.eval = {**cls().eval, **cfg.eval}
        if set(cfg.eval) - EVAL_KEYS:
            raise RecoverLoraError(f"unknown eval keys {sorted(set(cfg.eval) - EVAL_KEYS)}; known: {sorted(EVAL_KEYS)}")
        if cfg.eval.get("data_dir"):
            cfg.eval["data_dir"] = str(base / cfg.eval["data_dir"])
        return cfg

    def all_methods(self) -> dict[str, dict]:
        """The named methods plus the data sweep (``<method>@1k`` ...: that many synthetic sequences)."""
        out = dict(self.methods)
        sw = self.sweep or {}
        if sw:
            d = merge(self.recover, self.methods[sw["method"]]).get("distill", {})
            per_step = d.get("batch_size", 32) * d.get("grad_accum", 1)
            for n in sw.get("sequences", []):
                steps = sw.get("steps", "one-pass")
                steps = max(1, math.ceil(n / per_step)) if steps == "one-pass" else int(steps)
                warm = min(d.get("warmup_steps", 30), max(1, steps // 10))
                out[f"{sw['method']}@{_short(n)}"] = merge(self.methods[sw["method"]], {
                    "synth": {"num_sequences": n}, "distill": {"steps": steps, "warmup_steps": warm}})
        return out

    def plan_blocks(self, model: str) -> list[dict]:
        """The plan's blocks ({damages, methods}) of ``model``; one block of everything without a plan."""
        sel = self.plan.get(model) if self.plan else {}
        return [dict(b or {}) for b in (sel if isinstance(sel, list) else [sel])]

    def autocast_of(self, model: str | None) -> str | None:
        """``model``'s autocast from ``precision`` ("bf16" / "off"), or None where it names none."""
        return _AUTOCAST.get(self.precision.get(model)) if model is not None else None

    def common_config(self, model: str | None = None) -> RecoverConfig:
        """The settings every run of ``model`` shares (``recover``, with its precision's synthesis
        dtype): what the model's shared synthetic pool is made with."""
        return RecoverConfig.from_dict(merge(self.recover, self._precision_fixed(model)))

    def _precision_fixed(self, model: str | None) -> dict:
        p = self.precision.get(model) if model is not None else None
        if p is None:
            return {}
        a = _AUTOCAST[p]
        return {"distill": {"autocast": a}, "sft": {"autocast": a}, "synth": {"dtype": _SYNTH_DTYPE[p]}}

    def recover_config(self, model: str, damage: str, method: str, pool: Path | None) -> RecoverConfig:
        over = self.all_methods()[method]
        fixed = {"reference": self.models[model], "degraded": f"{self.models[model]} + {damage}",
                 "out_dir": str(run_dir(self, model, damage, method)), "data": str(pool) if pool else None,
                 "eval": {"tasks": [], "data_dir": self.eval.get("data_dir"), "limit": self.eval.get("limit")},
                 **self._precision_fixed(model)}
        return RecoverConfig.from_dict(merge(merge(self.recover, over), fixed))

    def damage_ops(self, model: str, damage: str) -> list:
        """The ops of ``damage`` for ``model``: its override, else the study-wide definition."""
        return (self.damage_overrides.get(model) or {}).get(damage, self.damages[damage])

    def uses_pool(self, method: str) -> bool:
        over = self.all_methods()[method]
        return "synth" not in over and over.get("method", self.recover.get("method")) != "sft-lora"


def merge(a: dict, b: dict) -> dict:
    """Deep merge of two config dicts (b wins)."""
    out = copy.deepcopy(a)
    for k, v in (b or {}).items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def _short(n: int) -> str:
    return f"{n // 1000}k" if n % 1000 == 0 and n >= 1000 else str(n)


def slug(name: str) -> str:
    """A folder name: 'auto+svd@1k' -> 'auto-svd-1k'."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-")


def run_dir(cfg: StudyConfig, model: str, damage: str, method: str) -> Path:
    return Path(cfg.study_dir) / slug(model) / slug(damage) / slug(method)


def degrade_config(cfg: StudyConfig, damage: str, model: str | None = None):
    from ..degrade import DegradeConfig, op_from_dict, parse_op

    spec = cfg.damage_ops(model, damage) if model is not None else cfg.damages[damage]
    ops = [parse_op(o) if isinstance(o, str) else op_from_dict(o) for o in spec]
    return DegradeConfig(ops=ops, seed=cfg.damage_seed)


def eval_config(cfg: StudyConfig, model: str | None = None) -> EvalConfig:
    """The evaluation of every run's measures (``eval``; ``model``'s precision where it has one)."""
    return EvalConfig(tasks=cfg.eval["tasks"], data_dir=cfg.eval.get("data_dir"), limit=cfg.eval.get("limit"),
                      autocast=cfg.autocast_of(model) or cfg.eval.get("autocast", "off"),
                      max_batch_tokens=cfg.eval.get("max_batch_tokens"))


def accuracy_config(cfg: StudyConfig, model: str | None = None) -> EvalConfig | None:
    """The evaluation of the headline rows on more items (``accuracy.limit``), or None."""
    return replace(eval_config(cfg, model), limit=cfg.accuracy.get("limit")) if cfg.accuracy else None

@dataclass
class Run:
    model: str
    damage: str
    method: str
    dir: Path
    headline: bool = False  # a headline method's run: accuracy on the accuracy items too

    @property
    def name(self) -> str:
        return f"{self.model}/{self.damage}/{self.method}"

    def trained(self) -> bool:
        """recover() finished here and what it saved is here too: the adapter (full-KD: the model) stays
        on the machine that trained it, while its report.json is mirrored and travels."""
        return (self.dir / "report.json").exists() and ((self.dir / "adapter").is_dir() or (self.dir / "model").is_dir())

    def accuracy_missing(self) -> bool:
        """A headline method's run without its accuracy run (it finished before ``accuracy.methods`` grew)."""
        return self.headline and not (self.dir / "eval" / "recovered-accuracy.json").exists()

    def accuracy_pending(self) -> bool:
        """An accuracy run still to make, with the adapter here to make it with."""
        return self.accuracy_missing() and self.trained()

    def status(self) -> str:
        if (self.dir / "done.json").exists():
            return "done, accuracy pending" if self.accuracy_pending() else "done"
        if (self.dir / FAILED).exists():
            return f"failed: {read_json(self.dir / FAILED).get('error', '?')[:120]} (tried again next call)"
        if self.trained():
            return "trained, evaluation pending"
        if (self.dir / "checkpoint.pt").exists():
            return "started: resumes from its checkpoint"
        if self.dir.is_dir() and any(self.dir.iterdir()):
            return "started"
        return "to do"


def _selected(run: Run, only: list[str] | None) -> bool:
    if not only:
        return True
    for pat in only:
        parts = (pat.strip("/").split("/") + ["*", "*"])[:3]
        if all(fnmatch.fnmatchcase(v, p) or fnmatch.fnmatchcase(slug(v), p)
               for v, p in zip((run.model, run.damage, run.method), parts)):
            return True
    return False


def plan(cfg: StudyConfig, only: list[str] | None = None, skip: list[str] | None = None) -> list[Run]:
    """The runs, model by model in the config's order (a plan's damages and methods in its order)."""
    runs: dict[str, Run] = {}
    headline = set((cfg.accuracy or {}).get("methods") or [])
    for m in cfg.models:
        if cfg.plan and m not in cfg.plan:
            continue
        for sel in cfg.plan_blocks(m):
            for d in sel.get("damages") or cfg.damages:
                for k in sel.get("methods") or cfg.all_methods():
                    runs.setdefault(f"{m}/{d}/{k}", Run(m, d, k, run_dir(cfg, m, d, k), k in headline))
    # model by model, block by block, damage by damage (one degraded model made at a time): a
    # plan's first block lands complete before its later ones (a sweep) start
    return [r for r in runs.values() if _selected(r, only) and not (skip and _selected(r, skip))]


def describe_plan(cfg: StudyConfig, runs: list[Run]) -> str:
    st = [r.status() for r in runs]
    pend = st.count("done, accuracy pending")
    lines = [f"study {cfg.study_dir}: {len(runs)} runs selected; {st.count('done') + pend} done"
             + (f" ({pend} of them accuracy pending)" if pend else "") + ", "
             f"{sum(not s.startswith('done') and s != 'to do' for s in st)} started, {st.count('to do')} to do"]
    width = max((len(r.name) for r in runs), default=0)
    for r, s in zip(runs, st):
        extra = ""
        if s.startswith("done"):
            extra = f" ({done_summary(read_json(r.dir / 'done.json'))})"
            if r.accuracy_missing() and not r.trained():
                extra += "; no accuracy run: its adapter is on the machine that trained it (--again trains it here)"
        lines.append(f"  {r.name:<{width}}  {s}{extra}")
    return "\n".join(lines)


def kl_closed(done: dict) -> float | None:
    """Share of the held-out KL removed: 1 - after / before."""
    h = done.get("heldout") or {}
    b, a = (h.get("before") or {}).get("kl"), (h.get("after") or {}).get("kl")
    return None if b is None or a is None or b <= 0 else 1 - a / b


def done_summary(done: dict) -> str:
    """A finished run in a line: its recover minutes (CPU minutes on a CPU, wall on a GPU) and the low-variance
    measures (accuracy gaps need RESULTS.md's resolved-task view)."""
    if done.get("device_name") == "cpu":  # the process's CPU minutes (RESULTS.md's), not wall minutes
        minutes = f"{(done.get('cpu_minutes') or {}).get('recover', 0):.1f} CPU min"
    else:
        minutes = f"{done.get('gpu_minutes', 0):.1f} GPU min"
    return (f"{minutes}, held-out KL removed {pct(kl_closed(done))}, "
            f"agreement {pct(done.get('agreement'))}")


def pct(x, ci=None) -> str:
    """A share as a whole percentage, with its CI if given: '42% [20, 60]'."""
    return "n/a" if x is None else f"{100 * x:.0f}%" + (f" [{100 * ci[0]:.0f}, {100 * ci[1]:.0f}]" if ci else "")

