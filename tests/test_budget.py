"""The cost estimate printed before a CPU run, and runs sized to a time budget."""

from __future__ import annotations

import json

import pytest
from tiny import tiny_model, tiny_tokenizer

from recover_lora import budget
from recover_lora.cli import main
from recover_lora.load import save_model_dir
from recover_lora.recover import RecoverConfig
from recover_lora.utils import RecoverLoraError


def test_parse_duration():
    assert budget.parse_duration("15m") == 900 and budget.parse_duration("1h30m") == 5400
    assert budget.parse_duration("90s") == 90 and budget.parse_duration("900") == 900
    assert budget.parse_duration("1.5h") == 5400 and budget.parse_duration(60) == 60
    for bad in ("abc", "0", "-5m", "15 minutes", "m"):
        with pytest.raises(RecoverLoraError, match="duration|positive"):
            budget.parse_duration(bad)


def test_budget_picks_the_most_steps_that_fit():
    model = tiny_model("llama")
    rate = 1e9  # a slow machine, so that the tiny model's steps cost something
    cfg = RecoverConfig()  # paper-sized: 600 steps of 32 x 128
    sized = budget.size_to_budget(cfg, model, 60.0, rate=rate)
    assert (cfg.distill.batch_size, cfg.synth.seq_len) == (budget.CPU_BATCH, budget.CPU_SEQ_LEN)
    assert sized["steps"] == cfg.distill.steps >= budget.MIN_STEPS
    assert budget.estimate(cfg, model, rate).total_s <= 60.0
    cfg.distill.steps += 1
    assert budget.estimate(cfg, model, rate).total_s > 60.0  # one more step would not fit
    kept = RecoverConfig()
    budget.size_to_budget(kept, model, 60.0, explicit={"batch_size", "seq_len"}, rate=rate)
    assert (kept.distill.batch_size, kept.synth.seq_len) == (32, 128) and kept.distill.steps < sized["steps"]
    with pytest.raises(RecoverLoraError, match="does not fit 10 steps"):
        budget.size_to_budget(RecoverConfig(), model, budget.FIXED_SECONDS + 1, rate=rate)


def test_estimate_scales_with_the_work():
    model = tiny_model("llama")
    a, b = RecoverConfig(placement="preset"), RecoverConfig(placement="preset")
    b.distill.steps *= 2
    ea, eb = budget.estimate(a, model, 1e9), budget.estimate(b, model, 1e9)
    assert eb.train_s == pytest.approx(2 * ea.train_s) and eb.synth_s == pytest.approx(2 * ea.synth_s)
    a.placement = "auto"  # the default: the diagnosis costs something too
    assert budget.estimate(a, model, 1e9).diagnose_s > 0 == ea.diagnose_s
    assert budget.estimate(RecoverConfig(), model, 1e9).diagnose_s > 0


def test_cpu_run_prints_its_cost_and_a_budget_sizes_and_resumes(tmp_path, capsys, monkeypatch):
    save_model_dir(tiny_model("llama", initializer_range=0.2), tmp_path / "ref", tiny_tokenizer())
    assert main(["degrade", "--model", str(tmp_path / "ref"), "--out-dir", str(tmp_path / "deg"), "--damage",
                 "noise:rel=0.3", "--load.device", "cpu"]) == 0
    base = ["recover", "--reference", str(tmp_path / "ref"), "--degraded", str(tmp_path / "deg"),
            "--load.device", "cpu", "--heldout-sequences", "4", "--adapter.rank", "2"]
    capsys.readouterr()
    assert main(base + ["--out-dir", str(tmp_path / "plain"), "--distill.steps", "3", "--distill.batch-size", "2", "--synth.seq-len", "8"]) == 0
    out = capsys.readouterr().out
    assert "recover on a CPU: this run will synthesize 6 x 8 tokens" in out and "train 3 steps of 2 x 8" in out
    assert "--time-budget" in out
    rep = json.loads((tmp_path / "plain" / "report.json").read_text())
    assert rep["cost_estimate"]["estimate"]["total_s"] > 0

    monkeypatch.setattr(budget, "gemm_rate", lambda *a, **k: 2e9)  # a slow CPU: the budget binds
    run = ["--out-dir", str(tmp_path / "b"), "--time-budget", "30s"]
    assert main(base + run) == 0
    out = capsys.readouterr().out
    sized = json.loads((tmp_path / "b" / "budget.json").read_text())
    rep = json.loads((tmp_path / "b" / "report.json").read_text())
    assert f"{sized['steps']} steps of 8 x 64" in out and rep["steps"] == sized["steps"] >= 10
    assert rep["synthetic_sequences"] == sized["steps"] * 8 and sized["estimate"]["total_s"] <= 30
    monkeypatch.setattr(budget, "gemm_rate", lambda *a, **k: 4e9)  # measured faster on the resume:
    assert main(base + run) == 0  # the run keeps the sizes it started with (else run.json would refuse it)
    assert json.loads((tmp_path / "b" / "report.json").read_text())["steps"] == sized["steps"]
