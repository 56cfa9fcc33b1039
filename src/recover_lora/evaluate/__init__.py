"""Evaluation stage: the paper's benchmarks scored exactly as lm-evaluation-harness 0.4 scores them.

Public API::

    from recover_lora.evaluate import EvalConfig, evaluate, TASKS, load_task_docs
    results = evaluate(model, tokenizer, EvalConfig(tasks=["arc_easy"], data_dir="eval-data", limit=500))
    results["arc_easy"]["acc"], results["arc_easy"]["acc_norm"], results["arc_easy"]["items"]["acc"]
"""

from .data import load_split, load_task_docs
from .refcache import ReferenceAnswers
from .runner import EvalConfig, build_requests, evaluate, evaluate_reference
from .scorer import encode_pairs, score
from .tasks import DEFAULT_TASKS, TASKS, Formatted, Task, get_task, hellaswag_preprocess, parse_tasks

__all__ = ["EvalConfig", "evaluate", "evaluate_reference", "ReferenceAnswers", "build_requests", "TASKS", "DEFAULT_TASKS", "Task", "Formatted",
           "get_task", "parse_tasks", "load_task_docs", "load_split", "encode_pairs", "score",
           "hellaswag_preprocess"]
