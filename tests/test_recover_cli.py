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
    assert main(["degrade", "--model", str(t / "ref"), "--out", str(t / "deg"), "--damage", "noise:rel=0.3",
                 "--seed", "0", "--device", "cpu"]) == 0
    damage = json.loads((t / "deg" / "damage.json").read_text())
    assert damage["seed"] == 0
    args = ["recover", "--reference", str(t / "ref"), "--degraded", str(t / "deg"), "--out", str(t / "run"),
            "--steps", "40", "--batch-size", "8", "--lr", "1e-2", "--warmup-steps", "2", "--num-sequences", "64",
            "--seq-len", "16", "--heldout", "8", "--rank", "8", "--merge", "--device", "cpu",
            "--eval", "arc_easy", "--eval-data", str(t / "eval")]
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

    assert main(["export", "--degraded", str(t / "deg"), "--adapter", str(t / "run" / "adapter"),
                 "--out", str(t / "exported"), "--reference", str(t / "ref")]) == 0
    exported = load_model(str(t / "exported"), cpu)
    with torch.no_grad():
        assert torch.allclose(exported(x).logits, merged(x).logits, atol=1e-5)


def test_cli_errors_are_clear(folders, capsys):
    t = folders
    save_model_dir(tiny_model("llama", num_hidden_layers=3), t / "other")
    rc = main(["recover", "--reference", str(t / "ref"), "--degraded", str(t / "other"), "--out", str(t / "x"),
               "--device", "cpu"])
    assert rc == 2
    assert "num_hidden_layers differs: reference 2, degraded 3" in capsys.readouterr().err
    assert main(["recover", "--reference", str(t / "ref"), "--degraded", str(t / "missing.safetensors"),
                 "--device", "cpu"]) == 2
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
    rc = main(["recover", "--reference", str(t / "ref"), "--degraded", str(t / "deg"), "--out", str(t / "x"),
               "--data", str(t / "bigdata"), "--steps", "1", "--batch-size", "4", "--device", "cpu"])
    assert rc == 2
    assert "beyond this model's vocabulary of 128" in capsys.readouterr().err


def test_training_flags_reach_the_config():
    from recover_lora.cli import _recover_config, build_parser

    a = build_parser().parse_args(["recover", "--reference", "r", "--degraded", "d", "--out", "o",
                                   "--hidden-weight", "50", "--teacher-topk", "64", "--lr", "5e-4"])
    cfg = _recover_config(a)
    assert (cfg.distill.hidden_weight, cfg.distill.teacher_topk, cfg.distill.lr) == (50.0, 64, 5e-4)
    b = build_parser().parse_args(["recover", "--reference", "r", "--degraded", "d", "--out", "o"])
    assert _recover_config(b).distill.hidden_weight == 0.0  # the paper's loss unless asked


def test_outputs_travel_a_moved_adapter_loads_and_cards_are_written(folders, monkeypatch):
    """Run with relative paths, move the adapter elsewhere, load it from another directory with
    plain PEFT (AutoPeftModelForCausalLM): same function as degraded + adapter. The adapter and the
    merged model carry a card; `export --dtype bfloat16` writes bf16 weights."""
    import shutil

    from peft import AutoPeftModelForCausalLM
    from safetensors import safe_open

    t = folders
    monkeypatch.chdir(t)
    assert main(["degrade", "--model", "ref", "--out", "deg", "--damage", "noise:rel=0.3", "--device", "cpu"]) == 0
    assert main(["recover", "--reference", "ref", "--degraded", "deg", "--out", "run", "--steps", "4",
                 "--batch-size", "4", "--seq-len", "16", "--heldout", "4", "--rank", "4", "--device", "cpu"]) == 0
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
    assert main(["export", "--degraded", str(t / "deg"), "--adapter", str(t / "elsewhere"),
                 "--out", str(t / "bf16"), "--reference", str(t / "ref"), "--dtype", "bfloat16"]) == 0
    with safe_open(str(t / "bf16/model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert "Repaired model" in (t / "bf16/README.md").read_text()
