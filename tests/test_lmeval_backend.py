"""lm-evaluation-harness as a backend: the same per-item choices as the built-in scorer on a tiny
model, through `eval`, `recover --eval-backend lm-eval` and `report` reading lm-eval's own files."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import WORDS, tiny_model, tiny_tokenizer

from recover_lora.cli import main
from recover_lora.evaluate import EvalConfig, evaluate
from recover_lora.evaluate.lmeval_backend import from_lmeval, read_results, write_lmeval_tasks
from recover_lora.load import save_model_dir

pytest.importorskip("lm_eval")


def _records(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    words = WORDS[6:40]
    arc, piqa, boolq, wino = [], [], [], []
    for i in range(n):
        p = torch.randperm(len(words), generator=g)[:8].tolist()
        w = [words[j] for j in p]
        arc.append({"id": f"q{i}", "question": " ".join(w[:3]),
                    "choices": {"text": [w[3], w[4] + " " + w[5], w[6], w[7]], "label": list("ABCD")},
                    "answerKey": "ABCD"[i % 4]})
        piqa.append({"goal": " ".join(w[:4]), "sol1": " ".join(w[4:6]), "sol2": w[6], "label": i % 2})
        boolq.append({"question": " ".join(w[:3]), "passage": " ".join(w[3:]), "answer": bool(i % 2)})
        wino.append({"sentence": f"{w[0]} {w[1]} _ {w[2]} {w[3]}", "option1": w[4], "option2": w[5],
                     "answer": str(1 + i % 2)})
    return {"arc_easy/test.jsonl": arc, "piqa/validation.jsonl": piqa, "boolq/validation.jsonl": boolq,
            "winogrande/validation.jsonl": wino}


@pytest.fixture
def data(tmp_path):
    for rel, recs in _records(12).items():
        f = tmp_path / "eval" / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return tmp_path / "eval"


TASKS = ["arc_easy", "piqa", "boolq", "winogrande"]


def test_lmeval_backend_chooses_as_the_builtin_scorer(data):
    model, tok = tiny_model("llama", initializer_range=0.2), tiny_tokenizer()
    ours = evaluate(model, tok, EvalConfig(tasks=TASKS, data_dir=str(data)), progress=False)
    lme = evaluate(model, tok, EvalConfig(tasks=TASKS, data_dir=str(data), backend="lm-eval"), progress=False)
    for t in TASKS:
        a, b = ours[t], lme[t]
        assert a["n"] == b["n"] == 12 and b["source"] == "lm-eval"
        assert a["items"]["pred"] == b["items"]["pred"] and a["acc"] == pytest.approx(b["acc"])
        assert a["items"]["gold"] == b["items"]["gold"]
        for x, y in zip(a["items"]["loglikelihoods"], b["items"]["loglikelihoods"]):
            assert x == pytest.approx(y, abs=1e-4)
        if "acc_norm" in a:
            assert a["items"]["pred_norm"] == b["items"]["pred_norm"] and a["acc_norm"] == pytest.approx(b["acc_norm"])


def test_recover_with_the_lmeval_backend_and_report_reads_lmeval_files(data, tmp_path):
    """`recover --eval-backend lm-eval` evaluates the three models through lm-eval; its repaired
    model's choices equal the built-in scorer's on the same adapter; `report` reads lm-eval's own
    results_*.json + samples files as written by `lm_eval --output_path ... --log_samples`."""
    from lm_eval.loggers import EvaluationTracker

    from recover_lora.load import LoadConfig, load_model
    from recover_lora.provenance import apply_adapter

    save_model_dir(tiny_model("llama", initializer_range=0.2), tmp_path / "ref", tiny_tokenizer())
    assert main(["degrade", "--model", str(tmp_path / "ref"), "--out-dir", str(tmp_path / "deg"), "--damage",
                 "noise:rel=0.3", "--load.device", "cpu"]) == 0
    assert main(["recover", "--reference", str(tmp_path / "ref"), "--degraded", str(tmp_path / "deg"),
                 "--out-dir", str(tmp_path / "run"), "--distill.steps", "6", "--distill.batch-size", "4",
                 "--synth.seq-len", "16", "--heldout-sequences", "4", "--adapter.rank", "4", "--load.device",
                 "cpu", "--eval.tasks", ",".join(TASKS), "--eval.data-dir", str(data), "--eval.backend",
                 "lm-eval"]) == 0
    rec = json.loads((tmp_path / "run/eval/recovered.json").read_text())
    assert {t: r["source"] for t, r in rec.items()} == {t: "lm-eval" for t in TASKS}
    repaired = apply_adapter(load_model(str(tmp_path / "deg"), LoadConfig(device="cpu")), tmp_path / "run/adapter")
    ours = evaluate(repaired, tiny_tokenizer(), EvalConfig(tasks=TASKS, data_dir=str(data)), progress=False)
    assert all(ours[t]["items"]["pred"] == rec[t]["items"]["pred"] for t in TASKS)
    assert json.loads((tmp_path / "run/report.json").read_text())["eval"]["tasks"]["arc_easy"]["n"] == 12

    # lm-eval's own output files, for the three models, read by `report`
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    names = write_lmeval_tasks(tmp_path / "tasks", data, TASKS)
    paths = {}
    for role, m in (("reference", load_model(str(tmp_path / "ref"), LoadConfig(device="cpu"))),
                    ("degraded", load_model(str(tmp_path / "deg"), LoadConfig(device="cpu"))),
                    ("recovered", repaired.get_base_model())):
        out = lm_eval.simple_evaluate(model=HFLM(pretrained=m, tokenizer=tiny_tokenizer(), batch_size=8),
                                      tasks=names, task_manager=TaskManager(include_path=str(tmp_path / "tasks")),
                                      log_samples=True, bootstrap_iters=0)
        tracker = EvaluationTracker(output_path=str(tmp_path / "lme" / role))
        samples = out.pop("samples")
        tracker.save_results_aggregated(results=out, samples=samples)
        for t in names:
            tracker.save_results_samples(task_name=t, samples=samples[t])
        paths[role] = tmp_path / "lme" / role
    back = read_results(paths["recovered"])["results"]
    assert {t: back[t]["items"]["pred"] for t in TASKS} == {t: rec[t]["items"]["pred"] for t in TASKS}
    assert main(["report", "--reference-results", str(paths["reference"]), "--degraded-results",
                 str(paths["degraded"]), "--recovered-results", str(paths["recovered"]), "--out-dir",
                 str(tmp_path / "rep")]) == 0
    rep = json.loads((tmp_path / "rep/report.json").read_text())
    assert set(rep["tasks"]) == set(TASKS) and rep["tasks"]["arc_easy"]["ci"] is not None


def test_from_lmeval_without_samples_keeps_the_accuracies():
    res = from_lmeval({"rl_arc_easy": {"acc,none": 0.5, "acc_norm,none": 0.25, "alias": "x"}, "other": {"x": 1}})
    assert res == {"arc_easy": {"acc": 0.5, "acc_norm": 0.25, "n": 0, "source": "lm-eval"}}
