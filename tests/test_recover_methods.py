"""recover --init svd|eora, --method full-kd|sft-lora, --placement auto end to end on a tiny model (CLI)."""

import copy
import json

import pytest
import torch
from tiny import tiny_model, tiny_tokenizer

from recover_lora.cli import main
from recover_lora.load import save_model_dir

ARC = [{"id": f"q{i}", "question": q, "choices": {"text": c, "label": ["A", "B", "C"]}, "answerKey": k}
       for i, (q, c, k) in enumerate([("the cat sat on the", ["mat", "sun", "tree"], "A"),
                                      ("one two three", ["four", "red", "dog"], "A"),
                                      ("the sun is", ["up", "down", "blue"], "C"),
                                      ("a dog ran to the", ["tree", "moon", "water"], "B")])]


@pytest.fixture
def folders(tmp_path):
    ref = tiny_model("llama", initializer_range=0.2)
    save_model_dir(ref, tmp_path / "ref", tiny_tokenizer())
    deg = copy.deepcopy(ref)  # rank-2 damage on every decoder linear
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, mod in deg.named_modules():
            if isinstance(mod, torch.nn.Linear) and ".layers." in name:
                o, i = mod.weight.shape
                mod.weight += 0.1 * torch.randn(o, 2, generator=g) @ torch.randn(2, i, generator=g)
    save_model_dir(deg, tmp_path / "deg", tiny_tokenizer())
    for split in ("test", "train"):
        d = tmp_path / "eval" / "arc_easy"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ARC))
    return tmp_path


def _args(t, out, *extra):
    return ["recover", "--reference", str(t / "ref"), "--degraded", str(t / "deg"), "--out-dir", str(t / out),
            "--distill.batch-size", "8", "--distill.warmup-steps", "2", "--synth.num-sequences", "32",
            "--synth.seq-len", "16", "--heldout-sequences", "8", "--load.device", "cpu", *extra]


@pytest.mark.parametrize("init", ["svd", "eora"])
def test_svd_only_with_zero_steps_repairs_low_rank_damage(folders, init):
    t = folders
    # preset placement: rank 4 on every module (auto spreads the budget by sensitivity, giving some modules
    # rank 1, below the damage's 2, and which ones depends on the CPU's float kernels)
    assert main(_args(t, init, "--distill.steps", "0", "--adapter.init", init, "--adapter.rank", "4", "--merge",
                      "--placement", "preset")) == 0
    rep = json.loads((t / init / "report.json").read_text())
    assert rep["steps"] == 0 and rep["init"] == init
    assert rep["heldout"]["before"]["kl"] > 1e-2 and rep["heldout"]["init"]["kl"] < 1e-6
    assert rep["heldout"]["after"]["kl"] < 1e-6 and rep["heldout"]["after"]["top1"] == 1.0


def test_a_warm_start_that_training_makes_worse_is_kept(folders):
    """keep_better_start: an exact svd start (rank-4 fix of rank-2 damage) trained at a step size that
    ruins it is put back (the adapter saved is the start itself); switched off, the ruined one stays;
    a partial start (rank 1) that training improves stays trained."""
    from safetensors.torch import load_file

    t = folders
    hot = ("--adapter.init", "svd", "--adapter.rank", "4", "--distill.lr", "0.05")
    assert main(_args(t, "start", "--distill.steps", "0", *hot)) == 0
    assert main(_args(t, "kept", "--distill.steps", "4", *hot)) == 0
    assert main(_args(t, "ruined", "--distill.steps", "4", "--no-keep-better-start", *hot)) == 0
    kept, ruined = (json.loads((t / n / "report.json").read_text()) for n in ("kept", "ruined"))
    check = kept["warm_start_check"]
    assert check["kept"] == "warm start" and check["start"]["kl"] < check["trained"]["kl"] and check["sequences"] == 8
    assert kept["heldout"]["after"] == kept["heldout"]["init"] and kept["steps"] == 4
    from recover_lora.metrics import read_metrics
    final = read_metrics(t / "kept" / "metrics.jsonl")[-1]  # the streamed metrics end with what was kept
    assert final["final"] and final["model"] == "warm start (kept)" and final["kl"] == kept["heldout"]["after"]["kl"]
    start, saved = (load_file(str(t / n / "adapter/adapter_model.safetensors")) for n in ("start", "kept"))
    assert start.keys() == saved.keys() and all(torch.equal(start[k], saved[k]) for k in start)
    assert "warm_start_check" not in ruined and ruined["heldout"]["after"]["kl"] > 10 * ruined["heldout"]["init"]["kl"]

    assert main(_args(t, "partial", "--distill.steps", "30", "--adapter.init", "svd", "--adapter.rank", "1",
                      "--distill.lr", "3e-3")) == 0
    rep = json.loads((t / "partial" / "report.json").read_text())
    assert rep["warm_start_check"]["kept"] == "trained" and rep["heldout"]["after"]["kl"] < rep["heldout"]["init"]["kl"]


def test_rewind_puts_a_ruined_warm_start_back_end_to_end(folders):
    """--distill.rewind-rise: the exact svd start, trained at a step that ruins it, goes back to the start
    once the loss rises (step 20, after a 20-step warm-up); the report, metrics and plot say so. With a
    near-zero step after the rewind the start survives without the warm-start check's help."""
    from recover_lora.metrics import read_metrics

    t = folders
    hot = ("--adapter.init", "svd", "--adapter.rank", "4", "--distill.lr", "0.05", "--distill.steps", "40",
           "--distill.warmup-steps", "20", "--no-keep-better-start", "--placement", "preset")
    assert main(_args(t, "rw", *hot, "--distill.rewind-rise", "1.2", "--distill.rewind-lr-scale", "1e-6")) == 0
    rep = json.loads((t / "rw" / "report.json").read_text())
    assert rep["rewound_at"] == 20 and rep["steps"] == 40
    assert [r["step"] for r in read_metrics(t / "rw" / "metrics.jsonl") if r["kind"] == "rewind"] == [20]
    assert rep["heldout"]["init"]["kl"] < 1e-6 and rep["heldout"]["after"]["kl"] < 1e-4
    assert (t / "rw" / "loss.png").stat().st_size > 0
    assert main(_args(t, "plain", *hot, "--distill.rewind-rise", "0")) == 0  # the same run unguarded: ruined
    plain = json.loads((t / "plain" / "report.json").read_text())
    assert "rewound_at" not in plain and plain["heldout"]["after"]["kl"] > 100 * rep["heldout"]["after"]["kl"]


def test_the_warm_start_check_does_not_stop_a_run_from_resuming():
    """The check acts after training: a run folder started without it (or by a version before it)
    resumes with it, since the training and its checkpoints are the same."""
    from recover_lora.config import RecoverConfig
    from recover_lora.recover import config_identity

    on, off = RecoverConfig(), RecoverConfig(keep_better_start=False)
    assert on.keep_better_start and config_identity(on) == config_identity(off)


def test_a_rewind_setting_left_off_keeps_older_runs_resumable():
    """rewind_rise came after runs were made: off, it is not part of a run's identity (so those runs
    resume); on, it is (a guarded run is another run)."""
    from recover_lora.config import DistillConfig, RecoverConfig
    from recover_lora.recover import config_identity

    off = config_identity(RecoverConfig(distill=DistillConfig(lr=5e-4)))
    assert "rewind_rise" not in off["distill"] and "rewind_lr_scale" not in off["distill"]
    on = config_identity(RecoverConfig())  # recover's default: on
    assert on["distill"]["rewind_rise"] == 1.2 and on != off


def test_full_kd_method(folders):
    t = folders
    assert main(_args(t, "fk", "--method", "full-kd", "--distill.steps", "10", "--full-kd.lr", "3e-3",
                      "--eval.tasks", "arc_easy", "--eval.data-dir", str(t / "eval"))) == 0
    rep = json.loads((t / "fk" / "report.json").read_text())
    assert rep["method"] == "full-kd" and rep["adapter"] is None and (t / "fk" / "model").is_dir()
    assert rep["trainable_parameters"] == sum(p.numel() for p in tiny_model("llama").parameters())
    assert rep["heldout"]["after"]["kl"] < rep["heldout"]["before"]["kl"]
    assert rep["eval"]["tasks"]["arc_easy"]["n"] == 4


def test_sft_lora_method(folders):
    t = folders
    assert main(_args(t, "sft", "--method", "sft-lora", "--sft.tasks", "arc_easy", "--sft.steps", "5",
                      "--sft.batch-size", "2", "--adapter.rank", "4", "--eval.tasks", "arc_easy", "--eval.data-dir",
                      str(t / "eval"))) == 0
    rep = json.loads((t / "sft" / "report.json").read_text())
    assert rep["method"] == "sft-lora" and rep["steps"] == 5 and rep["synthetic_sequences"] == 0
    assert rep["sft"]["tasks"] == {"arc_easy": 4} and rep["sft"]["nll_after"] < rep["sft"]["nll_before"]
    assert not (t / "sft" / "synth").exists()
    assert main(_args(t, "sft2", "--method", "sft-lora", "--sft.tasks", "piqa", "--eval.data-dir",
                      str(t / "eval"))) == 2  # no piqa train split: a clean error naming the task


def test_auto_placement_targets_the_planted_damage(tmp_path):
    from recover_lora.degrade import DegradeConfig, NoiseOp, degrade

    ref = tiny_model("llama", initializer_range=0.2)
    save_model_dir(ref, tmp_path / "ref", tiny_tokenizer())
    deg = copy.deepcopy(ref)
    degrade(deg, DegradeConfig(ops=[NoiseOp(rel=0.5)], modules=["attn"], layers=[1], seed=0))
    save_model_dir(deg, tmp_path / "deg", tiny_tokenizer())
    assert main(["recover", "--reference", str(tmp_path / "ref"), "--degraded", str(tmp_path / "deg"),
                 "--out-dir", str(tmp_path / "run"), "--placement", "auto", "--adapter.rank", "4",
                 "--distill.steps", "10", "--distill.batch-size", "8", "--distill.lr", "1e-2",
                 "--synth.num-sequences", "32", "--synth.seq-len", "12", "--heldout-sequences", "8",
                 "--load.device", "cpu"]) == 0
    rep = json.loads((tmp_path / "run" / "report.json").read_text())
    assert rep["placement"]["kind"] == "auto"
    targets = rep["placement"]["ranks"]
    assert targets and all(".layers.1.self_attn." in name for name in targets)
    assert rep["heldout"]["after"]["kl"] < rep["heldout"]["before"]["kl"]
    assert (tmp_path / "run" / "diagnosis" / "diagnosis.png").exists()
