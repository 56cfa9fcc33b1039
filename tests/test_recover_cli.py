"""End to end through the CLI on a tiny model: degrade -> recover -> adapter, merged model, report."""

import json

import pytest
import torch
from peft import PeftModel
from tiny import tiny_model, tiny_tokenizer

from recover_lora.cli import main
from recover_lora.load import LoadConfig, load_model, save_model_dir

ARC = [
    {"id": f"q{i}", "question": q, "choices": {"text": c, "label": ["A", "B", "C"]}, "answerKey": k}
    for i, (q, c, k) in enumerate([
        ("the cat sat on the", ["mat", "sun", "tree"], "A"),
        ("one two three", ["four", "red", "dog"], "A"),
        ("the sun is", ["up", "down", "blue"], "C"),
        ("a dog ran to the", ["tree", "moon", "water"], "B"),
    ])
]


@pytest.fixture
def folders(tmp_path):
    ref = tiny_model("llama", initializer_range=0.2)
    save_model_dir(ref, tmp_path / "ref", tiny_tokenizer())
    data = tmp_path / "eval" / "arc_easy"
    data.mkdir(parents=True)
    (data / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ARC))
    return tmp_path


def test_degrade_recover_export(folders, capsys):
    t = folders
    assert main(["degrade", "--model", str(t / "ref"), "--out-dir", str(t / "deg"), "--damage",
                 "noise:rel=0.3", "--seed", "0", "--load.device", "cpu"]) == 0
    damage = json.loads((t / "deg" / "damage.json").read_text())
    assert damage["seed"] == 0
    args = ["recover", "--reference", str(t / "ref"), "--degraded", str(t / "deg"), "--out-dir",
            str(t / "run"), "--distill.steps", "40", "--distill.batch-size", "8", "--distill.lr", "1e-2",
            "--distill.warmup-steps", "2", "--synth.num-sequences", "64", "--synth.seq-len", "16",
            "--heldout-sequences", "8", "--adapter.rank", "8", "--merge", "--load.device", "cpu",
            "--eval.tasks", "arc_easy", "--eval.data-dir", str(t / "eval")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "held-out KL" in out
    rep = json.loads((t / "run" / "report.json").read_text())
    before, after = rep["heldout"]["before"], rep["heldout"]["after"]
    assert after["kl"] < 0.7 * before["kl"]
    assert rep["steps"] == 40 and rep["train_tokens"] == 40 * 8 * 16
    assert len(rep["loss_curve"]) == 40
    assert (t / "run" / "loss.png").stat().st_size > 1000
    assert (t / "run" / "eval" / "report.md").exists() and (t / "run" / "eval" / "report.png").exists()
    assert not list((t / "run" / "eval").glob(".*.partial"))  # the evaluations finished: no kept batches left
    row = rep["eval"]["tasks"]["arc_easy"]
    assert row["n"] == 4 and 0 <= row["reference"] <= 100
    assert row["drop"] == pytest.approx(row["reference"] - row["degraded"])

    # the adapter is a standard PEFT folder; the merged model computes the same function
    cpu = LoadConfig(device="cpu")
    deg = load_model(str(t / "deg"), cpu)
    peft = PeftModel.from_pretrained(deg, str(t / "run" / "adapter"))
    merged = load_model(str(t / "run" / "merged"), cpu)
    x = torch.randint(4, 128, (2, 12))
    with torch.no_grad():
        assert torch.allclose(peft(x).logits, merged(x).logits, atol=1e-4)

    # the metrics streamed during the run: before, each step, after
    from recover_lora.metrics import read_metrics
    recs = read_metrics(t / "run" / "metrics.jsonl")
    assert recs[0]["kind"] == "heldout" and recs[0]["kl"] == pytest.approx(before["kl"])
    assert [r["loss"] for r in recs if r["kind"] == "train"] == [h["loss"] for h in rep["loss_curve"]]
    assert recs[-1]["final"] and recs[-1]["kl"] == pytest.approx(after["kl"])

    # running the same command again reuses the data and the finished checkpoint: nothing retrains
    assert main(args) == 0
    rep2 = json.loads((t / "run" / "report.json").read_text())
    assert rep2["heldout"]["after"] == pytest.approx(after)
    assert len(read_metrics(t / "run" / "metrics.jsonl")) == len(recs)  # nothing logged twice

    assert main(["export", "--degraded", str(t / "deg"), "--adapter", str(t / "run" / "adapter"), "--out-dir",
                 str(t / "exported"), "--reference", str(t / "ref")]) == 0
    exported = load_model(str(t / "exported"), cpu)
    with torch.no_grad():
        assert torch.allclose(exported(x).logits, merged(x).logits, atol=1e-5)


def test_cli_errors_are_clear(folders, capsys):
    t = folders
    save_model_dir(tiny_model("llama", num_hidden_layers=3), t / "other")
    rc = main(["recover", "--reference", str(t / "ref"), "--degraded", str(t / "other"), "--out-dir",
               str(t / "x"), "--load.device", "cpu"])
    assert rc == 2
    assert "num_hidden_layers differs: reference 2, degraded 3" in capsys.readouterr().err
    assert main(["recover", "--reference", str(t / "ref"), "--degraded", str(t / "missing.safetensors"),
                 "--load.device", "cpu"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_yaml_config(tmp_path):
    from recover_lora.recover import RecoverConfig
    from recover_lora.utils import RecoverLoraError

    (tmp_path / "c.yaml").write_text("degraded: d\ndistill:\n  steps: 7\n  lr: 0.001\nadapter:\n  modules: kv\n")
    cfg = RecoverConfig.from_yaml(tmp_path / "c.yaml")
    assert cfg.distill.steps == 7 and cfg.distill.lr == 0.001 and cfg.adapter.modules == "kv"
    assert cfg.distill.batch_size == 32  # untouched defaults stay
    (tmp_path / "bad.yaml").write_text("distill:\n  stepz: 7\n")
    with pytest.raises(RecoverLoraError, match="stepz"):
        RecoverConfig.from_yaml(tmp_path / "bad.yaml")


def test_data_from_a_bigger_vocabulary_is_refused(folders, capsys):
    from recover_lora.synth import SynthConfig, synthesize

    t = folders
    big = tiny_model("llama", vocab_size=4000, initializer_range=0.2)
    synthesize(big, tiny_tokenizer(), SynthConfig(num_sequences=16, seq_len=12), t / "bigdata", progress=False)
    save_model_dir(tiny_model("llama", seed=1), t / "deg")
    rc = main(["recover", "--reference", str(t / "ref"), "--degraded", str(t / "deg"), "--out-dir",
               str(t / "x"), "--data", str(t / "bigdata"), "--distill.steps", "1", "--distill.batch-size", "4",
               "--load.device", "cpu"])
    assert rc == 2
    assert "beyond this model's vocabulary of 128" in capsys.readouterr().err


def test_flags_are_the_config_fields_and_yaml_is_typed(tmp_path, capsys):
    """The CLI is derived from the config dataclasses: every field of every nested stage config is
    a dotted flag; a YAML's `lr: 1e-3` (a string to PyYAML) is the float it means, and flags
    override the YAML; a wrong type is refused before any work, naming the field."""
    import dataclasses

    from recover_lora.cli import parse
    from recover_lora.config import RecoverConfig

    cmd = parse(["recover", "--degraded", "d", "--out-dir", "o", "--distill.hidden-weight", "50",
                 "--distill.teacher-topk", "64", "--distill.lr", "5e-4", "--eval.tasks", "arc_easy", "piqa",
                 "--adapter.modules", "kv", "--full-kd.lr", "3e-5", "--sft.tasks", "piqa", "--load.device", "cpu"])
    cfg = cmd.recover_config()
    assert (cfg.distill.hidden_weight, cfg.distill.teacher_topk, cfg.distill.lr) == (50.0, 64, 5e-4)
    assert cfg.eval.tasks == ["arc_easy", "piqa"] and cfg.adapter.modules == "kv" and cfg.full_kd.lr == 3e-5
    assert cfg.sft.tasks == ["piqa"] and cfg.load.device == "cpu" and cfg.out_dir == "o"
    assert parse(["recover"]).recover_config() == RecoverConfig()  # no flag: the Python API's defaults
    # ... which are the CPU study's winner: the goals' method of study-cpu.yaml, on top of the common settings
    from pathlib import Path

    from recover_lora.study import StudyConfig, goal_methods
    from recover_lora.study.config import merge
    study = StudyConfig.from_yaml(Path(__file__).parents[1] / "study-cpu.yaml")
    best = goal_methods(study.goals)[0]  # (the others: earlier settings of it, kept where they ran)
    win = merge({k: study.recover[k] for k in ("placement", "adapter", "distill")}, study.methods[best])
    d = RecoverConfig()
    assert (d.placement, d.adapter.init, d.adapter.modules, d.distill.lr) == (
        win["placement"], win["adapter"]["init"], win["adapter"]["modules"], win["distill"]["lr"])
    assert main(["recover", "--degraded", "d", "--adapter.modules", "kv"]) == 2  # hand placement needs preset
    assert "--placement preset" in capsys.readouterr().err
    capsys.readouterr()
    assert parse(["recover", "--help"]) == 0
    help_text = capsys.readouterr().out
    for f in dataclasses.fields(RecoverConfig):  # every field has its flag, nested ones dotted
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        flag = "--" + f.name.replace("_", "-")
        names = [f"{flag}.{g.name.replace('_', '-')}" for g in dataclasses.fields(default)] \
            if dataclasses.is_dataclass(default) else [flag]
        for n in names:
            assert n in help_text or n.replace("--", "--no-", 1) in help_text, n

    (tmp_path / "run.yaml").write_text("degraded: d\ndistill:\n  lr: 1e-3\n  steps: 7\nsynth:\n  seq_len: 16\n")
    cmd = parse(["recover", "--config", str(tmp_path / "run.yaml"), "--distill.steps", "9"])
    cfg = cmd.recover_config()
    assert cfg.distill.lr == 1e-3 and isinstance(cfg.distill.lr, float) and cfg.distill.steps == 9
    assert cfg.synth.seq_len == 16 and cfg.degraded == "d"
    assert main(["recover", "--config", str(tmp_path / "run.yaml"), "--print-config"]) == 0
    assert "lr: 0.001" in capsys.readouterr().out
    (tmp_path / "bad.yaml").write_text("distill:\n  steps: ten\n")
    assert main(["recover", "--config", str(tmp_path / "bad.yaml")]) == 2
    assert "distill.steps" in capsys.readouterr().err
    assert main(["recover", "--distill.steps", "ten"]) == 2  # tyro refuses it, naming the flag


def test_help_imports_no_torch():
    """`--help` answers without importing torch (it takes ~2 s to import on these machines)."""
    import subprocess
    import sys

    code = ("import sys\nfrom recover_lora.cli import main\nfor c in ([], ['recover'], ['eval'], ['study'], "
            "['bench']):\n    main(c + ['--help'])\nprint('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "False", out.stderr[-2000:]


def test_outputs_travel_a_moved_adapter_loads_and_cards_are_written(folders, monkeypatch):
    """Run with relative paths, move the adapter elsewhere, load it from another directory with
    plain PEFT (AutoPeftModelForCausalLM): same function as degraded + adapter. The adapter and the
    merged model carry a card; `export --dtype bfloat16` writes bf16 weights."""
    import shutil

    from peft import AutoPeftModelForCausalLM
    from safetensors import safe_open

    t = folders
    monkeypatch.chdir(t)
    assert main(["degrade", "--model", "ref", "--out-dir", "deg", "--damage", "noise:rel=0.3",
                 "--load.device", "cpu"]) == 0
    assert main(["recover", "--reference", "ref", "--degraded", "deg", "--out-dir", "run", "--distill.steps",
                 "4", "--distill.batch-size", "4", "--synth.seq-len", "16", "--heldout-sequences", "4",
                 "--adapter.rank", "4", "--load.device", "cpu"]) == 0
    cfg = json.loads((t / "run/adapter/adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str((t / "deg").resolve())
    card = (t / "run/adapter/README.md").read_text()
    assert "base_model: " + str((t / "deg").resolve()) in card and "held-out KL" in card
    assert "recover-lora" in card and "AutoPeftModelForCausalLM" in card
    shutil.move(str(t / "run/adapter"), str(t / "elsewhere"))
    (t / "other").mkdir()
    monkeypatch.chdir(t / "other")
    moved = AutoPeftModelForCausalLM.from_pretrained(str(t / "elsewhere")).eval()
    deg = load_model(str(t / "deg"), LoadConfig(device="cpu"))
    direct = PeftModel.from_pretrained(deg, str(t / "elsewhere")).eval()
    x = torch.randint(4, 128, (2, 12))
    with torch.no_grad():
        assert torch.allclose(moved(x).logits, direct(x).logits, atol=1e-5)
    assert main(["export", "--degraded", str(t / "deg"), "--adapter", str(t / "elsewhere"), "--out-dir",
                 str(t / "bf16"), "--reference", str(t / "ref"), "--dtype", "bfloat16"]) == 0
    with safe_open(str(t / "bf16/model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert "Repaired model" in (t / "bf16/README.md").read_text()


def test_a_yaml_run_with_lr_1e_3_runs(folders):
    """PyYAML reads `lr: 1e-3` as a string; the typed reader makes it the float, and the run goes."""
    t = folders
    assert main(["degrade", "--model", str(t / "ref"), "--out-dir", str(t / "deg"), "--damage", "noise:rel=0.3",
                 "--load.device", "cpu"]) == 0
    (t / "run.yaml").write_text(f"reference: {t / 'ref'}\ndegraded: {t / 'deg'}\nout_dir: {t / 'run'}\n"
                                "heldout_sequences: 4\nload: {device: cpu}\nsynth: {seq_len: 12}\n"
                                "adapter: {rank: 4}\ndistill:\n  lr: 1e-3\n  steps: 3\n  batch_size: 4\n")
    assert main(["recover", "--config", str(t / "run.yaml")]) == 0
    rep = json.loads((t / "run" / "report.json").read_text())
    assert rep["config"]["distill"]["lr"] == 0.001 and rep["steps"] == 3
