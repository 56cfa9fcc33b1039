"""What recover-lora refuses, what resumes and what is atomic: each test reproduces a defect found by
trying the CLI as an attacker and as a careless user would (issue 14), on tiny models."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import shutil
import stat
import time

import pytest
import torch
from safetensors.torch import load_file
from tiny import tiny_model, tiny_tokenizer

from recover_lora.cli import main
from recover_lora.load import save_model_dir
from recover_lora.utils import RecoverLoraError

TRAIN = ["--distill.steps", "12", "--distill.batch-size", "4", "--distill.lr", "1e-2", "--distill.warmup-steps", "2",
         "--synth.num-sequences", "16", "--synth.seq-len", "12", "--heldout-sequences", "4", "--adapter.rank", "4",
         "--distill.checkpoint-every", "4", "--load.device", "cpu"]


@pytest.fixture
def t(tmp_path):
    ref = tiny_model("llama", initializer_range=0.2)
    save_model_dir(ref, tmp_path / "ref", tiny_tokenizer())
    assert main(["degrade", "--model", str(tmp_path / "ref"), "--out-dir", str(tmp_path / "deg"), "--damage",
                 "noise:rel=0.3", "--seed", "0", "--load.device", "cpu"]) == 0
    assert main(["degrade", "--model", str(tmp_path / "ref"), "--out-dir", str(tmp_path / "deg2"), "--damage",
                 "noise:rel=0.3", "--seed", "1", "--load.device", "cpu"]) == 0
    return tmp_path


def recover_args(t, out="run", degraded="deg", *extra):
    return ["recover", "--reference", str(t / "ref"), "--degraded", str(t / degraded), "--out-dir",
            str(t / out), *TRAIN, *extra]


class Planted:
    """Unpickling this object runs code (writes a marker file): what a planted checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


# 1. code from the output folder
def test_planted_pickle_checkpoint_is_refused_and_never_runs(t, capsys):
    marker = t / "PWNED"
    (t / "run").mkdir()
    torch.save({"trainable": Planted(marker), "optimizer": {}, "scheduler": {}, "state": {}, "config": {}},
               t / "run" / "checkpoint.pt")
    assert main(recover_args(t)) == 2
    assert "not a recover-lora checkpoint that loads safely" in capsys.readouterr().err
    assert not marker.exists()


def test_an_empty_or_torn_checkpoint_is_named(t, capsys):
    (t / "run").mkdir()
    (t / "run" / "checkpoint.pt").write_bytes(b"")
    assert main(recover_args(t)) == 2
    assert "checkpoint.pt is not a recover-lora checkpoint" in capsys.readouterr().err


# 2. data loss
def test_out_pointing_at_a_model_folder_is_refused_untouched(t, capsys):
    before = {p.name: p.read_bytes() for p in (t / "deg").iterdir() if p.is_file()}
    assert main(recover_args(t, "deg")) == 2
    err = capsys.readouterr().err
    assert "not a recover-lora run" in err and "model.safetensors" in err
    assert {p.name: p.read_bytes() for p in (t / "deg").iterdir() if p.is_file()} == before


def test_out_holding_a_foreign_config_json_is_refused(t, capsys):
    (t / "x").mkdir()
    (t / "x" / "config.json").write_text('{"model_type": "llama"}')
    assert main(recover_args(t, "x")) == 2
    assert "config.json that is not a recover-lora run" in capsys.readouterr().err
    assert (t / "x" / "config.json").read_text() == '{"model_type": "llama"}'


# 3. silent mixing of runs
def test_resume_with_another_degraded_model_or_plan_is_refused(t, capsys):
    assert main(recover_args(t, "run", "deg", "--distill.steps", "8")) == 0
    shutil.copytree(t / "run", t / "copy")
    config = (t / "copy" / "config.json").read_bytes()
    assert main(recover_args(t, "copy", "deg2", "--distill.steps", "8")) == 2
    assert "degraded_fingerprint" in capsys.readouterr().err
    assert main(recover_args(t, "copy", "deg", "--distill.steps", "8", "--adapter.rank", "8")) == 2
    assert "adapter.rank: 4 -> 8" in capsys.readouterr().err
    assert main(recover_args(t, "copy", "deg", "--distill.steps", "8", "--adapter.modules", "kv")) == 2
    assert "adapter.modules" in capsys.readouterr().err
    assert (t / "copy" / "config.json").read_bytes() == config  # nothing was written
    assert main(recover_args(t, "copy", "deg", "--distill.steps", "8", "--distill.eval-every", "3")) == 0  # cadence may change


# 4. NaN/Inf weights
def _plant_nan(folder):
    from safetensors.torch import save_file

    f = folder / "model.safetensors"
    sd = load_file(f)
    key = "model.layers.1.mlp.down_proj.weight"
    sd[key][0, :3] = torch.tensor([float("nan"), float("inf"), float("-inf")])
    save_file(sd, f, metadata={"format": "pt"})
    return key


@pytest.mark.parametrize("placement", ["preset", "auto"])
def test_nonfinite_weights_are_zeroed_recorded_and_applied_everywhere(t, placement):
    key = _plant_nan(t / "deg")
    assert main(recover_args(t, "run", "deg", "--placement", placement, "--distill.steps", "40", "--adapter.rank", "8",
                             "--synth.num-sequences", "64")) == 0
    text = (t / "run" / "report.json").read_text()
    rep = json.loads(text, parse_constant=lambda c: pytest.fail(f"report.json holds bare {c}"))
    assert rep["zeroed_nonfinite"] == {key: 3}
    assert rep["heldout"]["before"]["kl"] is None  # the model as given: NaN logits, said as null
    assert rep["heldout"]["before_zeroed_nonfinite"]["kl"] > rep["heldout"]["after"]["kl"]
    side = json.loads((t / "run" / "adapter" / "recover_lora.json").read_text())
    assert side["zeroed_nonfinite"] == {key: 3}
    assert all(torch.isfinite(v).all() for v in load_file(t / "run" / "adapter" / "adapter_model.safetensors").values())
    # export applies the same fix: the merged model is finite
    assert main(["export", "--degraded", str(t / "deg"), "--adapter", str(t / "run" / "adapter"), "--out-dir",
                 str(t / "merged")]) == 0
    assert all(torch.isfinite(v).all() for v in load_file(t / "merged" / "model.safetensors").values())
    # llama.cpp would apply it to the NaN/Inf as they are: no GGUF LoRA of such an adapter
    from recover_lora.export import export_gguf_lora

    with pytest.raises(RecoverLoraError, match="NaN/Inf weights zeroed"):
        export_gguf_lora(t / "run" / "adapter", t / "no.gguf", t / "a.gguf")


def test_an_adapter_not_trained_with_the_nan_is_refused(t, capsys):
    assert main(recover_args(t)) == 0
    _plant_nan(t / "deg")
    assert main(["export", "--degraded", str(t / "deg"), "--adapter", str(t / "run" / "adapter"), "--out-dir",
                 str(t / "merged")]) == 2
    assert "NaN/Inf weights" in capsys.readouterr().err and not (t / "merged").exists()


def test_a_run_whose_loss_is_not_finite_stops(tmp_path):
    from recover_lora.config import AdapterConfig, DistillConfig
    from recover_lora.distill import attach_adapters, train

    teacher, student = tiny_model("llama"), attach_adapters(tiny_model("llama", seed=1), AdapterConfig(rank=4))
    with torch.no_grad():
        teacher.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    ids = torch.randint(4, 128, (16, 8))
    with pytest.raises(RecoverLoraError, match="loss is not finite .* at step 1"):
        train(student, teacher, ids, DistillConfig(steps=5, batch_size=4, checkpoint_every=0), None,
              tmp_path / "ck.pt", progress=False)
    assert not (tmp_path / "ck.pt").exists()


# 5. export merges anything
@pytest.mark.parametrize("other", [dict(kind="qwen2"), dict(kind="llama", vocab_size=256)])
def test_export_refuses_an_adapter_from_another_model(t, capsys, other):
    assert main(recover_args(t)) == 0
    save_model_dir(tiny_model(**other), t / "other")
    assert main(["export", "--degraded", str(t / "other"), "--adapter", str(t / "run" / "adapter"),
                 "--out-dir", str(t / "merged")]) == 2
    err = capsys.readouterr().err
    assert "does not fit" in err and ("model_type" in err or "vocab_size" in err)
    assert not (t / "merged").exists()


# 6. unsafe writes
def test_a_failed_write_leaves_no_temp_file_and_the_old_file_intact(tmp_path, monkeypatch):
    from recover_lora import utils

    path = tmp_path / "checkpoint.pt"
    utils.atomic_torch_save({"a": torch.ones(2)}, path)

    def full_disk(obj, f):
        with open(f, "wb") as h:
            h.write(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError):
        utils.atomic_torch_save({"a": torch.zeros(2)}, path)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(2))


def test_two_runs_on_one_folder_exclude_each_other(t, capsys):
    from recover_lora.run_dir import RunLock

    with RunLock(t / "run"):
        assert main(recover_args(t)) == 2
        assert "in use by another recover-lora process" in capsys.readouterr().err
    assert main(recover_args(t)) == 0  # released: the folder is usable again


def test_written_files_are_readable_by_others(t):
    assert main(recover_args(t)) == 0
    for name in ("report.json", "run.json", "config.json", "checkpoint.pt", "loss.png"):
        mode = stat.S_IMODE((t / "run" / name).stat().st_mode)
        assert mode == 0o666 & ~_umask(), (name, oct(mode))
    torch.load(t / "run" / "checkpoint.pt", weights_only=True)  # our checkpoints need no pickle


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


# 7. late validation
def test_bad_eval_task_or_data_fails_before_any_work(t, capsys):
    assert main(recover_args(t, "run", "deg", "--eval.tasks", "arc_eazy")) == 2
    assert "unknown task 'arc_eazy'" in capsys.readouterr().err
    (t / "eval" / "arc_easy").mkdir(parents=True)
    assert main(recover_args(t, "run", "deg", "--eval.tasks", "arc_easy", "--eval.data-dir", str(t / "eval"))) == 2
    assert "arc_easy" in capsys.readouterr().err
    assert not (t / "run" / "synth").exists() and not (t / "run" / "config.json").exists()


@pytest.mark.parametrize("yaml_text, message", [
    ("distill:\n  steps: four\n", "distill.steps' must be int"),
    ("load: 5\n", "'load' must be a mapping"),
    ("adapter:\n  rank: 2.5\n", "adapter.rank' must be int"),
    ("heldout_sequences: true\n", "'heldout_sequences' must be int"),
])
def test_yaml_values_of_the_wrong_type_are_refused_at_once(tmp_path, capsys, yaml_text, message):
    (tmp_path / "c.yaml").write_text(yaml_text)
    assert main(["recover", "--config", str(tmp_path / "c.yaml"), "--print-config"]) == 2
    assert message in capsys.readouterr().err


def test_yaml_exponent_floats_are_floats(tmp_path):
    from recover_lora.recover import RecoverConfig

    (tmp_path / "c.yaml").write_text("distill:\n  lr: 1e-3\n")  # PyYAML reads this as a string
    assert RecoverConfig.from_yaml(tmp_path / "c.yaml").distill.lr == 1e-3


# 10. named errors, not tracebacks
@pytest.mark.parametrize("flags, message", [
    (["--load.device", "gpu0"], "unknown device 'gpu0'"),
    (["--load.device", "cuda:7"], "not available here"),
    (["--adapter.rank", "0"], "rank must be >= 1"),
    (["--adapter.init", "zeros"], "unknown adapter init 'zeros'"),
])
def test_bad_flags_are_named(t, capsys, flags, message):
    assert main(recover_args(t, "run", "deg", *flags)) == 2
    assert message in capsys.readouterr().err


# Fault injection: SIGKILL at random points (synthesis, training, checkpoint writes), then resume.
def _run_cli(args: list[str]) -> None:
    torch.set_num_threads(1)  # one thread in every run: the comparison is then bit for bit
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    os._exit(main(args))


def test_killed_at_random_points_then_resumed_equals_uninterrupted(t):
    ctx = multiprocessing.get_context("forkserver")  # children start without re-importing torch
    ctx.set_forkserver_preload(["recover_lora.cli", "recover_lora.recover", "peft", "transformers"])
    args = ["--distill.steps", "60", "--synth.num-sequences", "128", "--distill.checkpoint-every", "3"]

    def run(out, kill_after=None):
        p = ctx.Process(target=_run_cli, args=(recover_args(t, out, "deg", *args),))
        t0 = time.perf_counter()
        p.start()
        p.join(kill_after)
        if p.is_alive():
            p.kill()
            p.join()
            return None
        assert p.exitcode == 0, p.exitcode
        return time.perf_counter() - t0

    warm = ctx.Process(target=time.sleep, args=(0,))  # start the fork server (imports) before timing
    warm.start()
    warm.join()
    full = run("full")
    rng = random.Random(14)
    kills = 0
    for _ in range(3):  # each attempt gets a part of the work: in sum less than all of it
        if run("killed", rng.uniform(0.15, 0.35) * full) is None:
            kills += 1
    assert kills >= 1  # (usually all three die mid-run; a busy machine may let one finish)
    assert run("killed") is not None
    a = load_file(t / "full" / "adapter" / "adapter_model.safetensors")
    b = load_file(t / "killed" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
