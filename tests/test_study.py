"""The study runner on CPU: MHA twins, a miniature study end to end, resume, --only, --dry-run, RESULTS.md."""

import json
import re

import pytest
import torch
import yaml
from tiny import arc_records, tiny_model, tiny_tokenizer

from recover_lora import study
from recover_lora.cli import main
from recover_lora.config import RecoverConfig
from recover_lora.errors import RecoverLoraError
from recover_lora.load import LoadConfig, load_model, load_tokenizer, save_model_dir
from recover_lora.study import results
from recover_lora.twin import mha_twin
from recover_lora.utils import atomic_write_json


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma3"])
def test_mha_twin_is_exact(kind):
    model = tiny_model(kind, initializer_range=0.2)
    twin = mha_twin(model)
    c = model.config
    assert c.num_key_value_heads < c.num_attention_heads == twin.config.num_key_value_heads
    k = twin.model.layers[0].self_attn.k_proj
    assert k.weight.shape[0] == c.num_attention_heads * getattr(c, "head_dim", c.hidden_size // c.num_attention_heads)
    if kind == "qwen2":
        assert k.bias is not None and k.bias.shape[0] == k.weight.shape[0]
    ids = torch.randint(4, 128, (2, 40))  # longer than gemma3's sliding window (16)
    with torch.no_grad():
        ref, out = model(ids).logits, twin(ids).logits
    assert (ref - out).abs().max().item() < 1e-4
    if c.num_key_value_heads == 1:  # MQA: one order only
        return
    # the head order matters: tiling the KV heads instead of repeating each one breaks the equivalence
    n_rep = c.num_attention_heads // c.num_key_value_heads
    bad = mha_twin(model)
    with torch.no_grad():
        for layer, orig in zip(bad.model.layers, model.model.layers):
            for name in ("k_proj", "v_proj"):
                layer.self_attn.get_submodule(name).weight.copy_(orig.self_attn.get_submodule(name).weight.repeat(n_rep, 1))
        assert (bad(ids).logits - ref).abs().max().item() > 1e-3


def test_twin_spec_loads_the_twin(tmp_path):
    save_model_dir(tiny_model("llama"), tmp_path / "m", tiny_tokenizer())
    twin = load_model(f"mha:{tmp_path / 'm'}", LoadConfig(device="cpu"))
    assert twin.config.num_key_value_heads == twin.config.num_attention_heads == 4


@pytest.fixture
def study_yaml(tmp_path):
    save_model_dir(tiny_model("llama", initializer_range=0.2), tmp_path / "tiny", tiny_tokenizer())
    d = tmp_path / "eval" / "arc_easy"
    d.mkdir(parents=True)
    (d / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in arc_records(24)))
    cfg = {
        "study_dir": "study", "results": "RESULTS.md",
        "models": {"tiny": str(tmp_path / "tiny")},
        "damages": {"noise-all": ["noise:rel=0.3"]},
        "recover": {"load": {"dtype": "float32", "device": "cpu"}, "heldout_sequences": 8,
                    "synth": {"seq_len": 16, "batch_size": 16},
                    "placement": "preset", "adapter": {"rank": 4, "alpha": 8, "init": "default"},
                    "distill": {"steps": 3, "batch_size": 8, "lr": 1e-3, "warmup_steps": 1, "eval_every": 100,
                                "checkpoint_every": 100}},
        "eval": {"tasks": ["arc_easy"], "data_dir": "eval"},
        "methods": {"kv": {"adapter": {"modules": "kv"}},
                    "svd-only": {"placement": "auto", "adapter": {"init": "svd"}, "distill": {"steps": 0}}},
        "sweep": {"method": "kv", "sequences": [16]},
        "goals": {"method": ["svd-only", "kv@16"], "presets": ["kv"], "baselines": [], "min_gap_closed": 0.9},
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_miniature_study_runs_resumes_and_reports(study_yaml, monkeypatch, capsys):
    t = study_yaml.parent
    calls = []
    real = study.run.run_recover
    monkeypatch.setattr(study.run, "run_recover", lambda cfg, *a, **k: calls.append(cfg.out_dir) or real(cfg, *a, **k))
    cfg = study.StudyConfig.from_yaml(study_yaml)
    assert list(cfg.all_methods()) == ["kv", "svd-only", "kv@16"]
    assert cfg.recover_config("tiny", "noise-all", "kv@16", None).distill.steps == 2  # one pass: 16 / 8

    assert main(["study", "--config", str(study_yaml), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "3 runs selected; 0 done" in out and "tiny/noise-all/svd-only" in out and "to do" in out
    assert not (t / "study").exists()

    assert main(["study", "--config", str(study_yaml), "--only", "tiny/*/kv"]) == 0  # a piece
    assert len(calls) == 1 and (t / "study/tiny/noise-all/kv/done.json").exists()
    assert not (t / "study/tiny/noise-all/svd-only").exists()

    assert main(["study", "--config", str(study_yaml)]) == 0  # the rest
    assert len(calls) == 3
    for m in ("kv", "svd-only", "kv-16"):
        done = json.loads((t / "study/tiny/noise-all" / m / "done.json").read_text())
        assert done["trainable_parameters"] > 0 and done["gpu_minutes"] >= 0
    done = json.loads((t / "study/tiny/noise-all/svd-only/done.json").read_text())
    assert done["steps"] == 0 and done["train_tokens"] == 0 and done["placement"] == "auto"
    assert json.loads((t / "study/tiny/noise-all/kv/done.json").read_text())["train_tokens"] == 3 * 8 * 16
    assert (t / "study/tiny/synth/manifest.json").exists()  # the shared pool
    assert (t / "study/tiny/noise-all/kv-16/synth/manifest.json").exists()  # the sweep's own data
    assert (t / "study/tiny/eval/reference.json").exists() and (t / "study/tiny/noise-all/eval/degraded.json").exists()
    assert not list((t / "study").rglob("*.partial"))  # finished evaluations leave no kept batches behind

    capsys.readouterr()
    assert main(["study", "--config", str(study_yaml)]) == 0  # everything done: no training, no evaluation
    assert len(calls) == 3
    assert "3 done" in capsys.readouterr().out

    (t / "RESULTS.md").unlink()
    with open(t / "study/commands.log", "a") as f:  # as logged on a clone whose path the results' folder ends
        f.write(f"2026-01-01 00:00:00\tcpu\trecover-lora study --config=/elsewhere{t}/study.yaml "
                f"--eval.data-dir {t.absolute()}/eval\n")
    capsys.readouterr()
    assert main(["study", "--config", str(study_yaml), "--results-only"]) == 0
    res = (t / "RESULTS.md").read_text()
    printed = capsys.readouterr().out  # the goals, as RESULTS.md states them
    assert "## Goals" in printed and "| tiny | noise-all | svd-only |" in printed and "## tiny" not in printed
    assert "## Goals" in res and "| tiny | noise-all | svd-only |" in res and "| tiny | noise-all | kv@16 |" in res
    assert any(w in res for w in ("**PASS**", "**FAIL**"))
    assert "| accuracy (%) | " in res and "arc_easy" in res and "| reference |" in res and "| svd-only |" in res
    assert "| kv@16 |" in res and "## Commands" in res and "| degraded | " in res and "answer-token KL" in res
    commands = res.split("## Commands")[1]  # the config beside RESULTS.md is named as on any clone
    assert f"recover-lora study --config {study_yaml.name}\n" in commands
    assert f"--config=/elsewhere{t}/study.yaml --eval.data-dir eval\n" in commands  # only whole paths
    assert (t / "results" / "tiny-heldout-kl.png").stat().st_size > 0
    # what wins where: the method with the lowest held-out KL after, by the done files
    after = {m: json.loads((t / "study/tiny/noise-all" / study.slug(m) / "done.json").read_text())
             for m in ("kv", "svd-only", "kv@16")}
    low = sorted(("kv", "svd-only"), key=lambda m: after[m]["heldout"]["after"]["kl"])  # the sweep's run left out
    # the study at a glance: the goals' methods, the share of the held-out KL each removed, by the done files
    cfg = json.loads((t / "study/study.json").read_text())
    groups, methods, removed, agree = results.overview(results.collect(t / "study", cfg), cfg["goals"])
    assert groups == [("tiny", "noise-all")] and methods == ["svd-only", "kv@16", "kv"]
    for m in methods:
        h = after[m]["heldout"]
        assert removed[(groups[0], m)] == pytest.approx(1 - h["after"]["kl"] / h["before"]["kl"])
        assert 0 <= agree[(groups[0], m)] <= 1
    assert "![the study at a glance](results/overview.png)" in res and (t / "results/overview.png").stat().st_size > 0
    row = next(line for line in res.split("## What wins where")[1].splitlines() if line.startswith("| tiny |"))
    size = {m: after[m]["trainable_parameters"] for m in low}
    assert size[low[0]] != size[low[1]]  # kv's preset against the auto placement's budget: the sizes are said
    assert row.split(" | ")[2] == (f"**{low[0]}** {after[low[0]]['heldout']['after']['kl']:.3f} at "
                                   f"{results._num(size[low[0]])} ({low[1]} "
                                   f"{after[low[1]]['heldout']['after']['kl']:.3f} at {results._num(size[low[1]])})")
    # the data sweep: kv on its pool (3 steps of 8) and on 16 sequences (2 steps), by synthetic tokens
    sweep = res.split("Synthetic data sweep of kv (tiny, noise-all)")[1]
    lines = [ln for ln in sweep.splitlines() if ln.startswith("| ") and ln[2].isdigit()]
    assert [ln.split(" | ")[:2] for ln in lines] == [["| 16", "2"], ["| 24", "3"]]
    assert f"{after['kv@16']['heldout']['after']['kl']:.3f}" in lines[0]
    assert (t / "results" / "tiny-noise-all-sweep.png").stat().st_size > 0
    # svd-only is training-free: its start is its result; kv trains from the default (zero) start
    rows = {ln.split(" | ")[0][2:]: ln.split(" | ") for ln in res.split("### noise-all")[1].split("\n\n")[1].splitlines()}
    assert rows["svd-only"][2] == "-" and rows["kv"][2] == "-"
    cpu = sum(sum(d["cpu_minutes"].values()) for d in after.values()) / 60
    assert {d["cpu"] for d in after.values()} == {study.run.cpu_name()} and study.run.cpu_name()
    assert f"Time used: 3 finished runs {cpu:.1f} CPU-hours" in res
    evals = sum(json.loads(f.read_text())["seconds"] for f in [*(t / "study/tiny").glob("eval/*.json"),
                                                              *(t / "study/tiny").glob("*/eval/degraded*.json")])
    assert f"degraded models' evaluations {evals / 60:.1f} minutes (wall)." in res  # under an hour: minutes

    # the device round trip: pack the small files, unpack them into a fresh folder, same RESULTS.md
    assert main(["study", "--config", str(study_yaml), "--results-only", "--pack", str(t / "p.tar.gz")]) == 0
    import shutil
    shutil.rmtree(t / "study")
    (t / "RESULTS.md").unlink()
    assert main(["study", "--config", str(study_yaml), "--unpack", str(t / "p.tar.gz")]) == 0
    assert (t / "study/tiny/noise-all/kv/done.json").exists()
    assert not list((t / "study").rglob("*.pt")) and not list((t / "study").rglob("adapter"))
    assert (t / "RESULTS.md").read_text() == res
    # a later session on a fresh machine: the manifest came back, the shards did not; the pool is remade
    assert not study.run.synth_ready(t / "study/tiny/synth")
    for f in (t / "study/tiny/noise-all/kv").glob("done.json"):
        f.unlink()
    assert main(["study", "--config", str(study_yaml), "--only", "tiny/*/kv"]) == 0
    assert study.run.synth_ready(t / "study/tiny/synth")


def test_pool_mmlu_pools_the_subjects():
    r = {"arc_easy": {"acc": 0.5, "n": 2, "items": {"acc": [1, 0]}},
         "mmlu_a": {"acc": 1.0, "n": 1, "items": {"acc": [1]}},
         "mmlu_b": {"acc": 0.0, "n": 3, "items": {"acc": [0, 0, 0]}}}
    p = study.pool_mmlu(r)
    assert list(p) == ["arc_easy", "mmlu"] and p["mmlu"]["acc"] == 0.25 and p["mmlu"]["n"] == 4
    assert study.pool_mmlu(study.slim(r))["mmlu"]["items"]["acc"].tolist() == [1, 0, 0, 0]


def test_slim_items_are_compact_and_report_the_same():
    """The study keeps 0/1 item scores as "0110..." strings: same report, a fraction of the bytes."""
    from recover_lora.report import compute_report

    g = torch.Generator().manual_seed(0)

    def res(p):
        items = (torch.rand(500, generator=g) < p).int().tolist()
        return {"piqa": {"acc": sum(items) / 500, "acc_norm": sum(items) / 500, "n": 500,
                         "items": {"acc": items, "acc_norm": items, "loglikelihoods": [[0.0, 1.0]] * 500}}}

    ref, deg, rec = res(0.7), res(0.5), res(0.65)
    slim = [study.slim(r) for r in (ref, deg, rec)]
    assert isinstance(slim[0]["piqa"]["items"]["acc"], str) and "loglikelihoods" not in slim[0]["piqa"]["items"]
    assert len(json.dumps(slim[0])) < len(json.dumps({"piqa": {**ref["piqa"], "items": {
        k: v for k, v in ref["piqa"]["items"].items() if k != "loglikelihoods"}}}, indent=2)) / 5
    assert compute_report(*slim) == compute_report(ref, deg, rec)
    assert study.slim({"t": {"items": {"acc": [0.5, 1.0]}}})["t"]["items"]["acc"] == [0.5, 1.0]  # not 0/1: as is


def test_check_goals_pass_fail_and_missing():
    from recover_lora.report import compute_report

    def res(ones, n=200):
        return {"arc_easy": {"acc": ones / n, "n": n, "items": {"acc": [1] * ones + [0] * (n - ones)}}}

    ref, deg = res(160), res(100)  # a resolved gap of 30 points
    def run(k, kl, akl):
        return {"done": {"heldout": {"before": {"kl": 1.0}, "after": {"kl": kl}}}, "acc_tier": True,
                "report": compute_report(ref, deg, res(k)), "measures": {"average": {"answer_kl": akl}}}

    runs = {"auto+svd": run(158, 0.05, 0.02), "kv": run(130, 0.4, 0.1), "attn-mlp": run(150, 0.2, 0.05),
            "full-kd": run(120, 0.3, 0.08), "svd-only": run(60, 0.6, 0.3)}
    goals = {"method": "auto+svd", "presets": ["kv", "attn-mlp"], "baselines": ["full-kd", "svd-only"],
             "min_gap_closed": 0.9}
    g = study.check_goals(runs, goals)
    assert g["kl"] == ("PASS", "95%") and g["gap"][0] == g["presets"][0] == g["baselines"][0] == "PASS"
    assert "arc_easy" in g["gap"][1] and "no accuracy run" not in g["gap"][1]
    assert "(on the measures' items: no accuracy run)" in study.check_goals(
        {**runs, "auto+svd": {**runs["auto+svd"], "acc_tier": False}}, goals)["gap"][1]  # read on fewer items: said
    assert g["no_worse"][0] == "PASS" and "svd-only: arc_easy" in g["no_worse"][1]  # named; not the goal's method
    assert "one choice position" not in g["no_worse"][1]
    runs["svd-only"]["priors"] = {"reference": {"arc_easy": (0.5, 0)}, "svd-only": {"arc_easy": (0.85, 3)}}
    assert "(distance to the reference; one choice position: reference #1 50%, svd-only #4 85%)" in \
        study.check_goals(runs, goals)["no_worse"][1]  # the worse task is a position prior's: said so
    assert study.check_goals({**runs, "auto+svd": run(60, 0.05, 0.02)}, goals)["no_worse"][0] == "FAIL"
    assert study.check_goals(runs, {**goals, "min_gap_closed": 0.97})["kl"][0] == "FAIL"
    runs["full-kd"]["measures"]["average"]["answer_kl"] = 0.01  # full-kd closer on the benchmarks' answers
    assert study.check_goals(runs, goals)["baselines"][0] == "FAIL"
    del runs["full-kd"]
    assert study.check_goals(runs, goals)["baselines"] == ("n/a", "missing full-kd")
    assert study.check_goals(runs, {**goals, "presets": []})["presets"] == ("n/a", "none planned")
    runs["auto+svd"]["report"] = compute_report(ref, ref, res(160))  # no gap: nothing resolved
    assert study.check_goals(runs, goals)["gap"][0] == "n/a"


def test_choice_prior_reads_the_scored_metrics_predictions():
    from recover_lora.study.results import PRIOR_SHARE, choice_prior, prior_note

    res = {"mmlu": {"items": {"pred": "1111111110", "pred_norm": "0123012301"}},
           "hellaswag": {"items": {"pred": "0000000000", "pred_norm": [0, 1, 2, 3, 0, 1, 2, 3, 0, 0]}},
           "piqa": {"items": {"acc": "0110"}}}  # no predictions kept: no figure
    pr = choice_prior(res, {"mmlu": "acc", "hellaswag": "acc_norm", "piqa": "acc", "boolq": "acc"})
    assert pr == {"mmlu": (0.9, 1), "hellaswag": (0.4, 0)}
    assert PRIOR_SHARE <= 0.9
    assert prior_note({"reference": pr, "degraded": {"mmlu": (0.5, 3)}}, "mmlu") == "reference #2 90%, degraded #4 50%"
    assert prior_note({"reference": pr}, "hellaswag") == "" and prior_note({"reference": pr}, "piqa") == ""


def test_auto_runs_share_one_diagnosis(study_yaml, monkeypatch):
    """The second auto-placement run of a damage reuses the first one's plan (one diagnosis),
    with its own init; a run with another rank diagnoses afresh."""
    import recover_lora.diagnose as diagnose_mod

    d = yaml.safe_load(study_yaml.read_text())
    d["methods"] = {"svd-only": d["methods"]["svd-only"], "auto": {"placement": "auto"},
                    "auto-r2": {"placement": "auto", "adapter": {"rank": 2, "alpha": 4}}}
    d["sweep"] = None
    study_yaml.write_text(yaml.safe_dump(d))
    calls = []
    real = diagnose_mod.diagnose
    monkeypatch.setattr(diagnose_mod, "diagnose", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert main(["study", "--config", str(study_yaml)]) == 0
    assert len(calls) == 2  # one of svd-only / auto diagnosed, the other reused it; auto-r2 (other rank) diagnosed
    base = study_yaml.parent / "study/tiny/noise-all"
    plans = {m: json.loads((base / m / "diagnosis/plan.json").read_text()) for m in ("svd-only", "auto", "auto-r2")}
    shared = [m for m in plans if (base / m / "diagnosis/SHARED.txt").exists()]
    assert len(shared) == 1 and shared[0] in ("svd-only", "auto")
    assert plans["svd-only"]["ranks"] == plans["auto"]["ranks"]
    assert plans["svd-only"]["init"] == "svd" and plans["auto"]["init"] == "default"  # each its own
    rep = json.loads((base / "svd-only/report.json").read_text())
    assert rep["placement"]["init"] == "svd" and rep["steps"] == 0
    assert plans["auto-r2"]["base_rank"] == 2


@pytest.mark.parametrize("name", ["study.yaml", "study-smoke.yaml", "study-cpu.yaml", "tools/smoke-big-models.yaml"])
def test_shipped_study_configs_resolve(name):
    """Every run of the shipped study files builds a valid RecoverConfig and damage (no typo waits for the GPU)."""
    from pathlib import Path

    from recover_lora.degrade import op_from_dict, parse_op
    from recover_lora.recover import validate_config

    cfg = study.StudyConfig.from_yaml(Path(__file__).parents[1] / name)
    for m in cfg.models:
        for d, ops in cfg.damages.items():
            assert [parse_op(o) if isinstance(o, str) else op_from_dict(o) for o in ops]
            for method in cfg.all_methods():
                rc = cfg.recover_config(m, d, method, None)
                validate_config(rc)  # e.g. adapter.modules under the auto placement is refused
                assert rc.reference == cfg.models[m]
    assert set(cfg.goals["presets"]) | set(cfg.goals["baselines"]) | set(study.goal_methods(cfg.goals)) \
        <= set(cfg.all_methods())
    r = cfg.recover  # the studies pin what recover's defaults changed to (the study's winner)
    assert "placement" in r and {"init", "modules"} <= set(r["adapter"]) and "lr" in r["distill"], name


def test_pack_and_unpack_results(tmp_path):
    src = tmp_path / "src"
    keep = ["study.json", "commands.log", "m/eval/reference.json", "m/d/kv/done.json", "m/d/kv/eval/report.png",
            "m/d/auto/diagnosis/plan.json", "m/d/auto/diagnosis/SHARED.txt", "m/synth/manifest.json"]
    drop = ["m/synth/shard_00000.pt", "m/d/kv/adapter/adapter_config.json", "m/d/kv/merged/config.json",
            "m/d/kv/adapter/adapter_model.safetensors", "m/d/full-kd/model/config.json", "m/d/kv/checkpoint.pt"]
    for i, f in enumerate(keep + drop):
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        (src / f).write_text(f"content {i}")
    assert study.pack_results(src, tmp_path / "out" / "study.tar.gz") == len(keep)
    dst = tmp_path / "dst"
    (dst / "m/d/old").mkdir(parents=True)
    (dst / "m/d/old/done.json").write_text("earlier session")  # merged into, not replaced
    assert study.unpack_results(tmp_path / "out" / "study.tar.gz", dst) == len(keep)
    got = sorted(str(f.relative_to(dst)) for f in dst.rglob("*") if f.is_file())
    assert got == sorted(keep + ["m/d/old/done.json"])
    assert (dst / "m/d/kv/done.json").read_text() == f"content {keep.index('m/d/kv/done.json')}"
    with pytest.raises(RecoverLoraError, match="cannot unpack"):
        study.unpack_results(tmp_path / "nope.tar.gz", dst)


def test_damage_overrides_per_model(study_yaml):
    from recover_lora.degrade import degrade

    d = yaml.safe_load(study_yaml.read_text())
    d["models"]["big"] = d["models"]["tiny"]
    d["damage_overrides"] = {"big": {"noise-all": ["noise:rel=0.05"]}}
    study_yaml.write_text(yaml.safe_dump(d))
    cfg = study.StudyConfig.from_yaml(study_yaml)
    assert cfg.damage_ops("tiny", "noise-all") == ["noise:rel=0.3"]
    assert cfg.damage_ops("big", "noise-all") == ["noise:rel=0.05"]
    ref = tiny_model("llama", initializer_range=0.2)
    rel = {}
    for m in ("tiny", "big"):
        deg = tiny_model("llama", initializer_range=0.2)
        degrade(deg, study.degrade_config(cfg, "noise-all", m))
        w0, w1 = ref.model.layers[0].mlp.up_proj.weight, deg.model.layers[0].mlp.up_proj.weight
        rel[m] = ((w1 - w0).norm() / w0.norm()).item()
    assert rel["tiny"] == pytest.approx(0.3, rel=0.05) and rel["big"] == pytest.approx(0.05, rel=0.05)

    d["damage_overrides"] = {"big": {"rtn3": ["rtn:bits=3"]}}  # a damage the study does not define
    study_yaml.write_text(yaml.safe_dump(d))
    with pytest.raises(RecoverLoraError, match="damage_overrides"):
        study.StudyConfig.from_yaml(study_yaml)


def _done(folder, names):
    return {m: json.loads((folder / m / "done.json").read_text()) for m in names}


def test_parallel_workers_equal_one_process(study_yaml):
    """--jobs 2: two worker processes share the runs and produce what one process does, the auto
    runs diagnosed once before they start; an interrupted worker's run resumes at the next call."""
    d = yaml.safe_load(study_yaml.read_text())
    d["methods"]["auto"] = {"placement": "auto"}
    d["sweep"] = None
    study_yaml.write_text(yaml.safe_dump(d))
    par = study_yaml.parent / "par.yaml"
    par.write_text(yaml.safe_dump({**d, "study_dir": "study-par", "results": "RESULTS-par.md"}))
    names = ["kv", "svd-only", "auto"]

    assert main(["study", "--config", str(study_yaml)]) == 0
    assert main(["study", "--config", str(par), "--jobs", "2"]) == 0
    one = _done(study_yaml.parent / "study/tiny/noise-all", names)
    two = _done(study_yaml.parent / "study-par/tiny/noise-all", names)
    for m in names:
        assert two[m]["concurrent_runs"] == 2 and one[m]["concurrent_runs"] == 1
        assert two[m]["trainable_parameters"] == one[m]["trainable_parameters"]
        assert two[m]["heldout"]["after"]["kl"] == pytest.approx(one[m]["heldout"]["after"]["kl"], rel=1e-4)
        assert two[m]["gap_closed"] == pytest.approx(one[m]["gap_closed"], abs=1e-9)
    base = study_yaml.parent / "study-par/tiny/noise-all"
    assert len(list(base.glob("*/diagnosis/diagnosis.json"))) == 1  # one diagnosis, made before the workers
    assert (base / "auto/diagnosis/SHARED.txt").exists() != (base / "svd-only/diagnosis/SHARED.txt").exists()
    logs = sorted((study_yaml.parent / "study-par/logs").glob("worker-*.log"))
    assert len(logs) == 2 and not list(base.glob("*/.claim"))
    text = "".join(f.read_text() for f in logs)
    assert all(text.count(f"study: tiny/noise-all/{m} done") == 1 for m in names)  # each run by one worker
    assert "2 sharing" in (study_yaml.parent / "RESULTS-par.md").read_text()
    # the diagnosis made before the workers is its run's cost (timed apart: not written off as lost)
    diagnosed = next(m for m in ("auto", "svd-only") if not (base / m / "diagnosis/SHARED.txt").exists())
    t = json.loads((base / diagnosed / "timing.json").read_text())
    assert t["diagnose"] > 0 and "recover_lost" not in t
    assert two[diagnosed]["gpu_minutes"] == pytest.approx((t["recover"] + t["diagnose"]) / 60, abs=1e-3)

    # a worker that fails leaves its run unfinished, the others finish theirs; the next call completes it
    (base / "kv/done.json").unlink()
    (base / "auto/done.json").unlink()  # trained, evaluation pending
    (base / "kv/report.json").write_text("{not json")  # the worker that takes it dies reading it
    assert main(["study", "--config", str(par), "--jobs", "2"]) == 2
    assert (base / "auto/done.json").exists() and not (base / "kv/done.json").exists()
    assert not list(base.glob("*/.claim"))
    (base / "kv/report.json").unlink()
    assert main(["study", "--config", str(par), "--jobs", "2"]) == 0
    assert _done(base, ["kv"])["kv"]["heldout"]["after"]["kl"] == pytest.approx(one["kv"]["heldout"]["after"]["kl"],
                                                                                 rel=1e-4)


def test_stop_after_starts_nothing_late_and_an_interrupt_still_packs(study_yaml, monkeypatch):
    """--stop-after: no run starts past the deadline (the rest wait); --pack also runs when the call
    is interrupted (SIGTERM from `timeout` arrives as KeyboardInterrupt), so finished runs come back."""
    t = study_yaml.parent
    assert main(["study", "--config", str(study_yaml), "--stop-after", "0", "--pack", str(t / "a.tar.gz")]) == 0
    runs = study.plan(study.StudyConfig.from_yaml(study_yaml))
    assert [r.status() for r in runs] == ["to do"] * 3 and (t / "a.tar.gz").exists()

    assert main(["study", "--config", str(study_yaml), "--only", "tiny/*/kv"]) == 0

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(study.cli, "run_study", interrupted)
    assert main(["study", "--config", str(study_yaml), "--pack", str(t / "b.tar.gz")]) == 130
    n = study.unpack_results(t / "b.tar.gz", t / "unpacked")
    assert n > 0 and (t / "unpacked/tiny/noise-all/kv/done.json").exists()


def test_plan_accuracy_tier_answer_kl_and_mirror(study_yaml, capsys):
    """A plan picks runs per model; every run gets agreement and answer-token KL on the measures'
    items, headline methods accuracy on more items; small files land in the mirror as runs finish."""
    d = yaml.safe_load(study_yaml.read_text())
    d["damages"]["noise-kv"] = ["noise:rel=0.5,modules=kv"]
    d["eval"].update(limit=12, answer_kl=True)
    (study_yaml.parent / "notes.md").write_text("## Where the goals fall short\n\nHand-written reading.\n")
    d["eval"]["autocast"] = "bf16"  # the study's precision, which the model's own (fp32) overrides
    d.update(accuracy={"limit": 24, "methods": ["kv"]}, mirror="mirror", sweep=None, notes="notes.md",
             precision={"tiny": "fp32"},
             plan={"tiny": [{"damages": ["noise-kv"], "methods": ["svd-only"]},
                            {"damages": ["noise-all", "noise-kv"], "methods": ["kv"]}]},
             goals={"method": "kv", "presets": [], "baselines": ["svd-only"], "min_gap_closed": 0.9})
    study_yaml.write_text(yaml.safe_dump(d))
    cfg = study.StudyConfig.from_yaml(study_yaml)
    assert [r.name for r in study.plan(cfg)] == ["tiny/noise-kv/svd-only", "tiny/noise-all/kv", "tiny/noise-kv/kv"]
    assert main(["study", "--config", str(study_yaml)]) == 0
    t = study_yaml.parent
    base = t / "study/tiny"
    deg = json.loads((base / "noise-kv/eval/degraded.json").read_text())["results"]["arc_easy"]
    assert len(deg["items"]["answer_kl"]) == 12 and deg["answer_kl"] > 0 and len(deg["items"]["pred"]) == 12
    ref = json.loads((base / "eval/reference.json").read_text())["results"]["arc_easy"]
    assert "answer_kl" not in ref and json.loads((base / "eval/reference-accuracy.json").read_text())["results"][
        "arc_easy"]["n"] == 24
    assert (base / "noise-kv/kv/eval/recovered-accuracy.json").exists()
    assert not (base / "noise-kv/svd-only/eval/recovered-accuracy.json").exists()
    # the headline rows are evaluated once, on the accuracy items; their measures are its first items
    for f in ("eval/reference.json", "noise-kv/eval/degraded.json", "noise-kv/kv/eval/recovered.json"):
        assert json.loads((base / f).read_text())["derived_from"].endswith("accuracy.json"), f
    assert "derived_from" not in json.loads((base / "noise-kv/svd-only/eval/recovered.json").read_text())
    assert (base / "eval" / study.REF_ANSWERS).exists() and not list((base / "eval").glob("*-bf16.pt"))
    assert json.loads((base / "noise-kv/kv/config.json").read_text())["distill"]["autocast"] == "off"
    done = json.loads((base / "noise-kv/kv/done.json").read_text())
    assert done["accuracy_items"] == "accuracy" and 0 <= done["agreement"] <= 1 and done["answer_kl"] >= 0
    assert json.loads((base / "noise-kv/svd-only/done.json").read_text())["accuracy_items"] == "measures"
    mirror = t / "mirror/tiny"
    assert (mirror / "noise-kv/kv/done.json").read_bytes() == (base / "noise-kv/kv/done.json").read_bytes()
    assert (mirror / "noise-all/eval/degraded.json").exists()
    # of the data, the shared pool and held-out set travel (a few hundred KB); adapters and run copies do not
    shards = sorted(str(f.relative_to(mirror)).split("/")[0].split("-")[0] for f in mirror.rglob("*.safetensors"))
    assert shards == ["heldout", "synth"], shards
    res = (t / "RESULTS.md").read_text()
    assert "Accuracy (%), items: arc_easy 24" in res and "| tiny | noise-kv | kv |" in res
    assert "Per model: tiny in fp32 throughout" in res
    assert "| tiny | noise-all | kv |" in res and "svd-only" in res.split("## tiny")[1]
    goal_rows = {ln.split(" | ")[1]: ln for ln in res.split("## Goals")[1].split("## Where")[0].splitlines()
                 if ln.startswith("| tiny |")}
    assert "**PASS** svd-only" in goal_rows["noise-kv"] or "**FAIL** svd-only" in goal_rows["noise-kv"]
    assert "**n/a** none planned" in goal_rows["noise-all"]  # svd-only is not in noise-all's plan: not waited for
    assert "| tiny | noise-kv | kv |" in res.split("## Where the goals fall short\n\nHand-written reading.")[0]
    assert "## What wins where" in res.split("Hand-written reading.")[1]  # the notes follow the goals
    # a fresh checkout: the study folder is gone, the mirror is committed; nothing runs again
    import shutil
    shutil.rmtree(t / "study")
    assert main(["study", "--config", str(study_yaml), "--results-only"]) == 0  # made from the mirror
    assert (t / "RESULTS.md").read_text() == res
    shutil.rmtree(t / "study")
    capsys.readouterr()
    assert main(["study", "--config", str(study_yaml), "--dry-run"]) == 0
    assert ", 0 to do" in capsys.readouterr().out  # the mirrored runs count as done before anything runs
    assert study.run.synth_ready(base / "synth") and [f.read_bytes() for f in sorted((base / "synth").glob("*.sa*"))] \
        == [f.read_bytes() for f in sorted((mirror / "synth").glob("*.sa*"))]  # the same tokens, not made again
    real = study.run.run_recover
    study.run.run_recover = lambda *a, **k: pytest.fail("a finished run ran again")
    try:
        assert main(["study", "--config", str(study_yaml)]) == 0
    finally:
        study.run.run_recover = real
    assert (base / "noise-kv/kv/done.json").exists() and (t / "RESULTS.md").read_text() == res
    # the device round trip of a study that lives in its mirror here: unpacking fills the mirror too
    assert main(["study", "--config", str(study_yaml), "--results-only", "--pack", str(t / "p.tar.gz")]) == 0
    shutil.rmtree(t / "study")
    shutil.rmtree(t / "mirror")
    assert main(["study", "--config", str(study_yaml), "--unpack", str(t / "p.tar.gz")]) == 0
    assert (t / "mirror/tiny/noise-kv/kv/done.json").read_bytes() == (base / "noise-kv/kv/done.json").read_bytes()
    assert (t / "RESULTS.md").read_text() == res


def test_a_failing_run_is_recorded_and_the_others_go_on(study_yaml, monkeypatch, capsys):
    """Days of unattended runs: one run that raises is recorded in failed.json, the rest finish,
    the call ends with an error naming it, and the next call tries it again; once it finishes no
    failed.json is left in the mirror either, and a stale one beside a done.json fails no call."""
    d = yaml.safe_load(study_yaml.read_text())
    d.update(mirror="mirror")
    study_yaml.write_text(yaml.safe_dump(d))
    real = study.run.run_recover

    def flaky(cfg, *a, **k):
        if cfg.out_dir.endswith("/kv"):
            raise RuntimeError("out of memory (planted)")
        return real(cfg, *a, **k)

    monkeypatch.setattr(study.run, "run_recover", flaky)
    assert main(["study", "--config", str(study_yaml)]) == 2
    base = study_yaml.parent / "study/tiny/noise-all"
    assert "planted" in json.loads((base / "kv/failed.json").read_text())["error"]
    assert (base / "svd-only/done.json").exists() and (base / "kv-16/done.json").exists()
    assert "1 run(s) failed" in capsys.readouterr().err
    assert main(["study", "--config", str(study_yaml), "--dry-run"]) == 0
    assert "failed: RuntimeError: out of memory (planted)" in capsys.readouterr().out
    monkeypatch.setattr(study.run, "run_recover", real)
    assert main(["study", "--config", str(study_yaml)]) == 0
    assert (base / "kv/done.json").exists() and not (base / "kv/failed.json").exists()
    mirror = study_yaml.parent / "mirror/tiny/noise-all"
    assert (mirror / "kv/done.json").exists() and not (mirror / "kv/failed.json").exists()
    atomic_write_json(base / "kv/failed.json", {"error": "stale"})  # (as older mirrors brought back)
    assert main(["study", "--config", str(study_yaml)]) == 0


def test_measures_from_kept_answers_and_accuracy_items_equal_a_direct_evaluation(study_yaml):
    """The degraded model's measures as the study makes them (the first items of its accuracy
    evaluation, the answer-token KL from the reference's kept answers) equal an evaluation of
    those items with the reference run beside it."""
    import copy

    from recover_lora.degrade import degrade
    from recover_lora.evaluate import evaluate
    from recover_lora.load import load_model, load_tokenizer

    d = yaml.safe_load(study_yaml.read_text())
    d["eval"].update(limit=10, answer_kl=True)
    d.update(accuracy={"limit": 24, "methods": ["kv"]}, sweep=None, plan={"tiny": {"damages": ["noise-all"],
                                                                                    "methods": ["svd-only"]}})
    study_yaml.write_text(yaml.safe_dump(d))
    assert main(["study", "--config", str(study_yaml)]) == 0
    cfg = study.StudyConfig.from_yaml(study_yaml)
    made = json.loads((study_yaml.parent / "study/tiny/noise-all/eval/degraded.json").read_text())
    assert made["derived_from"] == "degraded-accuracy.json"
    ref = load_model(cfg.models["tiny"], RecoverConfig.from_dict(cfg.recover).load)
    tok = load_tokenizer(cfg.models["tiny"], RecoverConfig.from_dict(cfg.recover).load)
    deg = copy.deepcopy(ref)
    degrade(deg, study.degrade_config(cfg, "noise-all", "tiny"))
    direct = study.slim(evaluate(deg, tok, study.eval_config(cfg), progress=False, reference=ref))["arc_easy"]
    got = made["results"]["arc_easy"]
    assert got["n"] == direct["n"] == 10 and got["acc"] == direct["acc"]
    assert got["items"]["pred"] == direct["items"]["pred"] and got["items"]["acc"] == direct["items"]["acc"]
    assert got["items"]["answer_kl"] == pytest.approx(direct["items"]["answer_kl"], rel=1e-3)
    assert got["answer_kl"] == pytest.approx(direct["answer_kl"], rel=1e-3) and got["answer_kl"] > 1e-3


def test_two_processes_side_by_side_share_what_they_both_need(study_yaml):
    """Two study processes on disjoint runs of one model: the reference's answers and the pool are
    made once (the second waits on the lock and reuses them), and both runs finish."""
    import os
    import subprocess
    import sys

    d = yaml.safe_load(study_yaml.read_text())
    d["damages"]["noise-kv"] = ["noise:rel=0.5,modules=kv"]
    d["eval"].update(limit=12, answer_kl=True)
    d.update(sweep=None, plan={"tiny": {"damages": ["noise-all", "noise-kv"], "methods": ["kv"]}})
    study_yaml.write_text(yaml.safe_dump(d))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "recover_lora.cli", "study", "--config", str(study_yaml)]
    procs = [subprocess.Popen(cmd + ["--only", sel], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for sel in ("tiny/noise-all", "tiny/noise-kv")]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    both = "".join(logs)
    assert both.count("keeping the reference's answers") == 1, both
    base = study_yaml.parent / "study/tiny"
    assert (base / "noise-all/kv/done.json").exists() and (base / "noise-kv/kv/done.json").exists()
    assert "synth_pool" in json.loads((base / "timing.json").read_text())
    made = [ln for ln in both.splitlines() if "synthetic data:" in ln and ln.rstrip().endswith("tiny/synth")]
    assert len(made) == 1, made  # the pool: generated by one process, reused by the other


def test_locked_makes_the_second_comer_wait(tmp_path):
    """study.locked: whoever comes second enters only after the first left (and sees what it made)."""
    import threading
    import time as _time

    lock, made, seen = tmp_path / "x" / ".lock", tmp_path / "made", []

    def first():
        with study.locked(lock):
            entered.set()
            _time.sleep(0.5)
            made.write_text("1")

    def second():
        entered.wait()
        with study.locked(lock):
            seen.append(made.exists())

    entered = threading.Event()
    ts = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(10)
    assert seen == [True]


def test_timed_keeps_the_cost_of_a_process_killed_outright(tmp_path):
    """study.run.timed writes as it goes: a run killed with SIGKILL (a session's end) still has its
    seconds so far on record, and the next block adds to them."""
    import subprocess
    import sys
    import time as _time

    f = tmp_path / "timing.json"
    code = ("import time, pathlib\nfrom recover_lora.study.run import timed\n"
            f"with timed(pathlib.Path({str(f)!r}), 'recover', beat=0.1):\n"
            "    t = time.time()\n    while True: pass\n")
    proc = subprocess.Popen([sys.executable, "-c", code])
    t0 = _time.time()
    while not f.exists() and _time.time() - t0 < 120:  # its first beat (after importing torch)
        _time.sleep(0.05)
    _time.sleep(1.0)
    proc.kill()
    proc.wait()
    d = json.loads(f.read_text())
    assert 0.9 < d["recover"] < 1.5 and 0.05 < d["recover_cpu"] <= d["recover"] + 0.2, d
    with study.run.timed(f, "recover"):
        _time.sleep(0.2)
    e = json.loads(f.read_text())
    assert d["recover"] + 0.2 <= e["recover"] < d["recover"] + 1.0 and e["recover_cpu"] >= d["recover_cpu"]


def test_shared_locks_overlap_and_an_exclusive_one_waits_for_them(tmp_path):
    """study.locked(shared=True): runs side by side hold it together; a heavy run's exclusive lock
    enters only when both have left, and holds a later shared one off until it leaves."""
    import threading
    import time as _time

    lock, events = tmp_path / ".memory.lock", []
    both_in = threading.Barrier(2, timeout=10)

    def light(name):
        with study.locked(lock, shared=True):
            both_in.wait()  # fails (BrokenBarrierError) unless both shared holders are inside at once
            events.append(f"{name} in")
            _time.sleep(0.3)
            events.append(f"{name} out")

    def heavy_run():
        _time.sleep(0.1)
        with study.locked(lock):
            events.append("heavy in")
            _time.sleep(0.3)
            events.append("heavy out")

    ts = [threading.Thread(target=light, args=(n,)) for n in ("a", "b")] + [threading.Thread(target=heavy_run)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(10)
    assert events.index("heavy in") > max(events.index("a out"), events.index("b out")), events
    assert len(events) == 6


def test_heavy_is_full_kd_whose_training_copies_exceed_the_machine_share():
    from recover_lora.study.run import heavy

    model = tiny_model("llama")
    n = sum(p.numel() for p in model.parameters())
    full, lora = RecoverConfig.from_dict({"method": "full-kd"}), RecoverConfig()
    need = 5 * 4 * n  # weights, gradients, two AdamW moments and the reference, fp32
    assert heavy(full, model, ram_bytes=int(need / 0.4) - 1) and not heavy(full, model, ram_bytes=int(need / 0.4) + 1)
    assert not heavy(lora, model, ram_bytes=1)


def test_a_heavy_run_computes_on_every_core_and_the_next_on_one_again(study_yaml, monkeypatch):
    """Study processes run one thread each; a heavy run (full-KD of a big model), which holds the
    machine alone, uses every core for its training and evaluation, and the next run is back on one."""
    import os

    d = yaml.safe_load(study_yaml.read_text())
    d.update(sweep=None, methods={**d["methods"], "full-kd": {"method": "full-kd"}},
             plan={"tiny": {"damages": ["noise-all"], "methods": ["full-kd", "kv"]}},
             goals={"method": "kv", "presets": [], "baselines": [], "min_gap_closed": 0.9})
    study_yaml.write_text(yaml.safe_dump(d))
    seen, real = {}, study.run.run_recover
    monkeypatch.setattr(study.run, "run_recover",
                        lambda cfg, *a, **k: seen.setdefault(cfg.method, torch.get_num_threads()) and real(cfg, *a, **k))
    monkeypatch.setattr(study.workers, "heavy", lambda rcfg, reference: rcfg.method == "full-kd")  # tiny: not by size
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["study", "--config", str(study_yaml)]) == 0
        cores = len(os.sched_getaffinity(0))
        assert seen == {"full-kd": cores, "recover-lora": 1}
        assert torch.get_num_threads() == 1
        base = study_yaml.parent / "study/tiny/noise-all"
        assert json.loads((base / "full-kd/done.json").read_text())["threads"] == cores  # recorded,
        assert json.loads((base / "kv/done.json").read_text())["threads"] == 1
        row = next(x for x in (study_yaml.parent / "RESULTS.md").read_text().splitlines() if x.startswith("| full-kd |"))
        assert row.endswith(f" CPU, {cores} threads |") if cores > 1 else row.endswith(" CPU |")  # and shown
        with pytest.raises(RuntimeError), study.run.machine_threads(True):
            raise RuntimeError  # a failed heavy run gives the threads back too
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_results_name_tasks_answered_from_a_choice_position_prior(study_yaml, monkeypatch):
    """Under each accuracy table: the tasks on which some model picked one choice position on at least
    PRIOR_SHARE of the items, each model's position and share, in the table's row order."""
    from recover_lora.study import results as results_mod

    assert main(["study", "--config", str(study_yaml), "--only", "tiny/*/kv"]) == 0
    res = (study_yaml.parent / "RESULTS.md").read_text()
    n_rows = res.count("| kv |")
    fake = {"reference": (0.95, 0), "degraded": (0.5, 2), "kv": (0.85, 1)}
    calls = iter(["reference", "degraded", "kv"] * 4)  # collect() asks for reference, degraded, method
    monkeypatch.setattr(results_mod, "choice_prior", lambda r, metrics: {t: fake[next(calls)] for t in metrics})
    results_mod.write_results(study_yaml.parent / "study", study_yaml.parent / "RESULTS.md",
                              study.StudyConfig.from_yaml(study_yaml))
    res = (study_yaml.parent / "RESULTS.md").read_text()
    assert res.count("| kv |") == n_rows
    assert "arc_easy: reference #1 95%, degraded #3 50%, kv #2 85%." in res
    fake.update(reference=(0.5, 0), kv=(0.79, 1))
    calls = iter(["reference", "degraded", "kv"] * 4)
    results_mod.write_results(study_yaml.parent / "study", study_yaml.parent / "RESULTS.md",
                              study.StudyConfig.from_yaml(study_yaml))
    assert "One choice position" not in (study_yaml.parent / "RESULTS.md").read_text()  # none at 80%


def test_a_run_after_full_kd_gets_a_fresh_degraded_model(study_yaml):
    """full-KD trains the degraded model in place (no copy: memory); the next run of the same damage
    must start from the degraded model as made, so its adapter is the one it trains alone."""
    from safetensors.torch import load_file

    d = yaml.safe_load(study_yaml.read_text())
    d.update(sweep=None, methods={**d["methods"], "full-kd": {"method": "full-kd", "full_kd": {"lr": 1e-2}}},
             plan={"tiny": {"damages": ["noise-all"], "methods": ["full-kd", "kv"]}},
             goals={"method": "kv", "presets": [], "baselines": [], "min_gap_closed": 0.9})
    study_yaml.write_text(yaml.safe_dump(d))
    assert main(["study", "--config", str(study_yaml)]) == 0
    base = study_yaml.parent / "study/tiny/noise-all"
    fk = json.loads((base / "full-kd/done.json").read_text())["heldout"]
    assert fk["after"]["kl"] < fk["before"]["kl"]  # full-KD moved the weights
    after_full_kd = load_file(str(base / "kv/adapter/adapter_model.safetensors"))
    import shutil
    shutil.rmtree(study_yaml.parent / "study")
    assert main(["study", "--config", str(study_yaml), "--only", "tiny/noise-all/kv"]) == 0
    alone = load_file(str(base / "kv/adapter/adapter_model.safetensors"))
    assert after_full_kd.keys() == alone.keys() and all(torch.equal(after_full_kd[k], alone[k]) for k in alone)


def test_an_interrupted_run_stops_the_study(study_yaml, monkeypatch):
    """SIGTERM / Ctrl-C inside a run's training (an Interrupted error, its checkpoint saved) stops the
    study there: no later run starts and the run is not recorded as failed (it resumes next call)."""
    from recover_lora.errors import Interrupted

    started = []

    def stopped(cfg, *a, **k):
        started.append(cfg.out_dir)
        raise Interrupted("interrupted at step 1; checkpoint saved (planted)")

    monkeypatch.setattr(study.run, "run_recover", stopped)
    assert main(["study", "--config", str(study_yaml)]) != 0
    base = study_yaml.parent / "study/tiny/noise-all"
    assert len(started) == 1 and not list(base.glob("*/failed.json")) and not list(base.glob("*/done.json"))


def test_an_evaluation_killed_mid_pass_resumes_where_it_stopped(tmp_path, monkeypatch):
    """``cached_eval``: a kill in the middle of an evaluation keeps its finished batches; the next call
    scores only the rest, writes what one uninterrupted evaluation writes, and drops the kept batches."""
    from recover_lora.evaluate import EvalConfig, evaluate, runner
    from recover_lora.evaluate.partial import partial_path

    d = tmp_path / "eval" / "arc_easy"
    d.mkdir(parents=True)
    (d / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in arc_records(40)))
    ecfg = EvalConfig(tasks=["arc_easy"], data_dir=str(tmp_path / "eval"), max_batch_tokens=64, share_context=False)
    model, tok = tiny_model("llama"), tiny_tokenizer()
    n_fwd = {"n": 0}
    h = model.register_forward_pre_hook(lambda m, a: n_fwd.update(n=n_fwd["n"] + 1))
    whole = study.slim(evaluate(model, tok, ecfg, progress=False))
    h.remove()
    assert n_fwd["n"] >= 4
    real = runner.score  # every finished batch kept at once
    monkeypatch.setattr(runner, "score", lambda *a, **k: real(*a, **{**k, "resume_every": 0.0}))

    calls = {"n": 0, "kill_at": 3}

    def hook(m, args):
        calls["n"] += 1
        if calls["n"] == calls["kill_at"]:
            raise KeyboardInterrupt
    h = model.register_forward_pre_hook(hook)
    out = tmp_path / "run" / "eval" / "degraded.json"
    import time

    def slow(m, args):  # the first pass takes >= 0.3 s before its kill
        time.sleep(0.1)
    h2 = model.register_forward_pre_hook(slow)
    with pytest.raises(KeyboardInterrupt):
        study.run.cached_eval(out, lambda: model, tok, ecfg, progress=False)
    h2.remove()
    assert not out.exists() and len(list(partial_path(out).glob("shard-*.pt"))) == 2
    first = json.loads((partial_path(out) / "elapsed.json").read_text())
    assert first["earlier"] == 0 and first["seconds"] >= 0.2  # two scored batches' time, kept
    calls.update(n=0, kill_at=None)
    t0 = time.perf_counter()
    got = study.run.cached_eval(out, lambda: model, tok, ecfg, progress=False)
    second = time.perf_counter() - t0
    h.remove()
    assert calls["n"] == n_fwd["n"] - 2  # the two batches kept before the kill were not scored again
    assert got == whole and json.loads(out.read_text())["results"] == whole
    # its time: this pass's and the interrupted one's
    seconds = json.loads(out.read_text())["seconds"]
    assert first["seconds"] + 0.5 * min(second, 0.01) <= seconds <= second + first["seconds"] + 0.01
    assert not partial_path(out).exists()


def test_chart_order_puts_the_goal_method_presets_and_baselines_first_and_the_sweep_last():
    goals = {"method": "auto+eora", "presets": ["kv", "attn-mlp"], "baselines": ["full-kd", "eora-only"]}
    got = results.chart_order(["auto+eora-r64", "auto+eora", "auto+eora@240", "sft-lora", "eora-only", "kv"],
                              goals, "auto+eora")
    assert got == ["auto+eora", "kv", "eora-only", "auto+eora-r64", "sft-lora", "auto+eora@240"]


def test_eval_settings_reach_the_evaluation_and_unknown_ones_are_refused(study_yaml):
    d = yaml.safe_load(study_yaml.read_text())
    d["eval"]["max_batch_tokens"] = 4096
    study_yaml.write_text(yaml.safe_dump(d))
    cfg = study.StudyConfig.from_yaml(study_yaml)
    assert study.eval_config(cfg).max_batch_tokens == 4096
    d["eval"]["max_batch_token"] = 4096  # a typo would otherwise be ignored in silence
    study_yaml.write_text(yaml.safe_dump(d))
    with pytest.raises(RecoverLoraError, match="unknown eval keys"):
        study.StudyConfig.from_yaml(study_yaml)


def test_precision_per_model(study_yaml):
    """A model's precision overrides the study's autocast in its training and scoring; a bad one is named."""
    d = yaml.safe_load(study_yaml.read_text())
    d["recover"]["distill"]["autocast"] = "bf16"
    d["eval"]["autocast"] = "bf16"
    d["models"]["twin"] = "mha:" + d["models"]["tiny"]
    d["precision"] = {"tiny": "fp32"}
    study_yaml.write_text(yaml.safe_dump(d))
    cfg = study.StudyConfig.from_yaml(study_yaml)
    assert cfg.recover_config("tiny", "noise-all", "kv", None).distill.autocast == "off"
    assert cfg.recover_config("tiny", "noise-all", "kv", None).sft.autocast == "off"
    assert cfg.recover_config("twin", "noise-all", "kv", None).distill.autocast == "bf16"
    # its synthetic data decoded in its precision whatever the machine ("auto" follows the CPU's bf16)
    assert cfg.recover_config("tiny", "noise-all", "kv", None).synth.dtype == "float32"
    assert cfg.common_config("tiny").synth.dtype == "float32" and cfg.common_config("twin").synth.dtype == "auto"
    assert cfg.recover_config("twin", "noise-all", "kv", None).synth.dtype == "auto"
    assert study.eval_config(cfg, "tiny").autocast == "off" and study.eval_config(cfg, "twin").autocast == "bf16"
    assert study.config.accuracy_config(cfg, "tiny") is None  # no accuracy tier in this study
    d["precision"] = {"tiny": "fp16"}
    study_yaml.write_text(yaml.safe_dump(d))
    with pytest.raises(RecoverLoraError, match="precision"):
        study.StudyConfig.from_yaml(study_yaml)


def test_mirror_leaves_out_resume_state(tmp_path):
    """An interrupted evaluation's kept batches (``.<name>.partial/``) are not result files: not mirrored."""
    from recover_lora.study.files import _small_files

    for f in ("m/eval/reference.json", "m/eval/.reference.partial/key.json", "m/.lock.json", "m/run/done.json"):
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_text("{}")
    assert [str(f.relative_to(tmp_path)) for f in _small_files(tmp_path)] == ["m/eval/reference.json",
                                                                               "m/run/done.json"]


def test_a_model_with_no_finished_run_gets_its_rows_but_no_chart(study_yaml, monkeypatch):
    """While a model's first run is going, RESULTS.md shows its degraded rows, and no empty chart."""
    def fails(*a, **k):
        raise RuntimeError("still running (planted)")

    monkeypatch.setattr(study.run, "run_recover", fails)
    assert main(["study", "--config", str(study_yaml), "--only", "tiny/noise-all/kv"]) == 2
    t = study_yaml.parent
    res = (t / "RESULTS.md").read_text()
    assert "## tiny (`" in res and "| degraded |" in res
    assert "![held-out KL]" not in res and not (t / "results" / "tiny-heldout-kl.png").exists()


def test_every_run_of_a_model_measures_on_one_heldout_set(study_yaml, monkeypatch):
    """The held-out set is made once per model and settings and copied into each run: the same
    sequences whatever process or device made a run (a GPU's runs made theirs a little differently)."""
    from pathlib import Path

    from recover_lora.synth import load_synthetic

    d = yaml.safe_load(study_yaml.read_text())
    d["methods"]["kv-h4"] = {"adapter": {"modules": "kv"}, "heldout_sequences": 4}  # other settings: its own set
    d["sweep"] = None
    study_yaml.write_text(yaml.safe_dump(d))
    made = []
    real = study.run.share_heldout.__globals__["locked"]

    def counting_locked(path, *a, **k):  # each shared set is made (or found) under its lock
        made.append(Path(path).name)
        return real(path, *a, **k)

    monkeypatch.setitem(study.run.share_heldout.__globals__, "locked", counting_locked)
    assert main(["study", "--config", str(study_yaml)]) == 0
    t = study_yaml.parent / "study/tiny"
    shared = sorted(t.glob("heldout-*"))
    assert len(shared) == 2  # heldout_sequences 8 (kv, svd-only) and 4 (kv-h4)
    sets = {p.name: load_synthetic(p) for p in shared}
    runs = {m: load_synthetic(t / "noise-all" / m / "heldout") for m in ("kv", "svd-only", "kv-h4")}
    eight = next(v for v in sets.values() if len(v) == 8)
    four = next(v for v in sets.values() if len(v) == 4)
    assert torch.equal(runs["kv"], eight) and torch.equal(runs["svd-only"], eight) and torch.equal(runs["kv-h4"], four)
    assert sum(n.startswith(".heldout-") for n in made) == 3  # one lock visit a run
    digest = {m: json.loads((t / "noise-all" / m / "done.json").read_text())["heldout_digest"] for m in runs}
    assert digest["kv"] == digest["svd-only"] != digest["kv-h4"] and len(digest["kv"]) == 16
    # a run's manifest that came back from another machine without its shards: the shared set replaces it
    import shutil

    kv = t / "noise-all" / "kv"
    (kv / "done.json").unlink()
    shutil.rmtree(kv / "adapter")
    for f in (kv / "heldout").glob("*.safetensors"):
        f.unlink()
    # (the shared set reordered, so that a set the run made again by itself would differ from it)
    from safetensors.torch import save_file

    shard = next(p for p in shared if len(load_synthetic(p)) == 8) / "shard-00000.safetensors"
    save_file({"input_ids": eight.flip(0).contiguous()}, str(shard))
    assert main(["study", "--config", str(study_yaml), "--only", "tiny/*/kv"]) == 0
    assert torch.equal(load_synthetic(kv / "heldout"), eight.flip(0))
    assert json.loads((kv / "done.json").read_text())["heldout_digest"] != digest["svd-only"]
    # what a run makes by itself on this CPU is the same set: results do not change
    from recover_lora.config import RecoverConfig, train_synth_config
    from recover_lora.load import load_model, load_tokenizer
    from recover_lora.synth import heldout

    rcfg = RecoverConfig.from_dict(d["recover"])
    ref = load_model(d["models"]["tiny"], rcfg.load)
    # (made into a folder, as a run makes it: there synthesis decodes in bf16 on a CPU that has bf16
    # matmuls, `synth.dtype: auto`, and the in-memory set of heldout(out_dir=None) is decoded in fp32)
    own = heldout(ref, load_tokenizer(d["models"]["tiny"], rcfg.load), train_synth_config(rcfg), 8,
                  study_yaml.parent / "own-heldout", progress=False)
    assert torch.equal(own.long(), eight.long())


def test_skip_leaves_matching_runs_out(study_yaml, capsys):
    """--skip takes the --only globs away from the plan (a short lease leaves the long @100k out)."""
    cfg = study.StudyConfig.from_yaml(study_yaml)
    assert [r.method for r in study.plan(cfg, None, ["*/*/*@*"])] == ["kv", "svd-only"]
    assert [r.method for r in study.plan(cfg, ["tiny"], ["*/*/kv*"])] == ["svd-only"]
    assert main(["study", "--config", str(study_yaml), "--dry-run", "--skip", "*/*/kv@16,*/*/svd-only"]) == 0
    out = capsys.readouterr().out
    assert "1 runs selected" in out and "tiny/noise-all/kv " in out and "kv@16" not in out
    with pytest.raises(RecoverLoraError, match="selects no run"):
        study.run_study(cfg, ["tiny"], dry_run=True, skip=["tiny"])


def test_a_report_without_its_adapter_trains_again(study_yaml, capsys):
    """A run trained on another machine came back as its small files (report.json, no adapter): it is
    trained again here, not evaluated from an adapter that is not there."""
    import shutil

    assert main(["study", "--config", str(study_yaml), "--only", "tiny/*/kv"]) == 0
    run = study_yaml.parent / "study/tiny/noise-all/kv"
    before = json.loads((run / "done.json").read_text())
    (run / "done.json").unlink()
    shutil.rmtree(run / "adapter")
    capsys.readouterr()
    assert main(["study", "--config", str(study_yaml), "--only", "tiny/*/kv", "--dry-run"]) == 0
    assert "trained, evaluation pending" not in capsys.readouterr().out
    assert main(["study", "--config", str(study_yaml), "--only", "tiny/*/kv"]) == 0
    after = json.loads((run / "done.json").read_text())
    assert (run / "adapter").is_dir() and after["heldout"]["after"]["kl"] == pytest.approx(before["heldout"]["after"]["kl"])


def test_a_run_set_aside_on_the_device_is_set_aside_here_on_unpack(study_yaml):
    """``--again`` on a device machine, cut short after the set-aside: its archive holds earlier/1/ and
    not the earlier done.json; unpacked here it must not leave that done.json in place (the run would
    read "done" with the new attempt's files beside it)."""
    import shutil

    t, name = study_yaml.parent, "tiny/noise-all/kv"
    d = yaml.safe_load(study_yaml.read_text())
    d.update(mirror="mirror")
    study_yaml.write_text(yaml.safe_dump(d))
    assert main(["study", "--config", str(study_yaml), "--only", name]) == 0
    first = (t / "mirror" / name / "done.json").read_bytes()
    dev = t / "dev"  # the device's checkout: the repository's mirror, its own study folder
    shutil.copytree(t / "mirror", dev / "mirror")
    (dev / "study.yaml").write_text(yaml.safe_dump({**d, "eval": {**d["eval"], "data_dir": str(t / "eval")}}))
    assert main(["study", "--config", str(dev / "study.yaml"), "--only", name, "--again", name]) == 0
    (dev / "study" / name / "done.json").unlink()  # as if stopped before the new attempt finished
    study.pack_results(dev / "study", t / "p.tar.gz")
    shutil.rmtree(t / "study")  # a fresh checkout here: the study lives in its mirror
    assert main(["study", "--config", str(study_yaml), "--unpack", str(t / "p.tar.gz")]) == 0
    for f in (t / "study" / name, t / "mirror" / name):
        assert (f / "earlier/1/done.json").read_bytes() == first and not (f / "done.json").exists()
        assert (f / "report.json").exists() and not (f / "earlier/2").exists()
    assert study.plan(study.StudyConfig.from_yaml(study_yaml), [name])[0].status() != "done"
    assert main(["study", "--config", str(study_yaml), "--unpack", str(t / "p.tar.gz")]) == 0  # twice: the same
    assert not (t / "mirror" / name / "earlier/2").exists()


def test_setting_aside_is_all_or_nothing_and_the_kept_diagnosis_keeps_its_time(tmp_path, monkeypatch):
    """A Ctrl-C while a run is set aside waits until both folders (study, mirror) are moved, then
    stops the call; the diagnosis the new attempt reuses takes its minutes out of the earlier attempt's."""
    import os
    import shutil
    import signal

    from recover_lora.study import files

    folders = [tmp_path / "study/run", tmp_path / "mirror/run"]
    for f in folders:
        (f / "diagnosis").mkdir(parents=True)
        (f / "done.json").write_text("{}")
        atomic_write_json(f / "timing.json", {"recover": 10.0, "diagnose": 5.0, "diagnose_cpu": 4.0})
    real, calls = shutil.move, []
    monkeypatch.setattr(files.shutil, "move", lambda a, b: calls.append(1) or (
        len(calls) == 1 and os.kill(os.getpid(), signal.SIGINT)) or real(a, b))
    with pytest.raises(KeyboardInterrupt):
        files.set_aside_folders(folders)
    for f in folders:
        assert not (f / "done.json").exists() and (f / "earlier/1/done.json").exists() and (f / "diagnosis").is_dir()
        assert json.loads((f / "earlier/1/timing.json").read_text()) == {"recover": 10.0}
        assert json.loads((f / "timing.json").read_text()) == {"diagnose": 5.0, "diagnose_cpu": 4.0}
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_mirror_inside_the_study_folder_is_refused(study_yaml):
    d = yaml.safe_load(study_yaml.read_text())
    for mirror in ("study/mirror", "."):
        study_yaml.write_text(yaml.safe_dump({**d, "mirror": mirror}))
        with pytest.raises(RecoverLoraError, match="one is inside the other"):
            study.StudyConfig.from_yaml(study_yaml)
    study_yaml.write_text(yaml.safe_dump({**d, "mirror": "study"}))  # the same folder: allowed
    assert study.StudyConfig.from_yaml(study_yaml).mirror


def test_a_finished_run_whose_method_becomes_a_headline_one_gets_its_accuracy_run(study_yaml, capsys, monkeypatch):
    """``accuracy.methods`` grows after runs finished: those whose adapter is here are evaluated on the
    accuracy items (not trained again; their measures kept); one trained elsewhere stays as it is."""
    import shutil

    d = yaml.safe_load(study_yaml.read_text())
    d["damages"]["noise-kv"] = ["noise:rel=0.5,modules=kv"]
    d.update(accuracy={"limit": 24, "methods": ["kv"]}, sweep=None, eval={**d["eval"], "limit": 12})
    study_yaml.write_text(yaml.safe_dump(d))
    assert main(["study", "--config", str(study_yaml)]) == 0
    base = study_yaml.parent / "study/tiny"
    here, elsewhere = base / "noise-all/svd-only", base / "noise-kv/svd-only"
    shutil.rmtree(elsewhere / "adapter")  # as a run made on another machine comes back
    meas = (here / "eval/recovered.json").read_bytes()
    assert not (here / "eval/recovered-accuracy.json").exists()
    d["accuracy"]["methods"] = ["kv", "svd-only"]
    study_yaml.write_text(yaml.safe_dump(d))
    first = json.loads((here / "done.json").read_text())
    atomic_write_json(here / "done.json", {**first, "concurrent_runs": 3})  # as if trained beside two others
    capsys.readouterr()
    assert main(["study", "--config", str(study_yaml), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"tiny/noise-all/svd-only +done, accuracy pending", out), out
    assert re.search(r"tiny/noise-kv/svd-only +done \(.*; no accuracy run: its adapter is on the machine", out)
    assert "4 done (1 of them accuracy pending)" in out
    monkeypatch.setattr(study.run, "run_recover", lambda *a, **k: pytest.fail("a finished run trained again"))
    assert main(["study", "--config", str(study_yaml)]) == 0
    acc = json.loads((here / "eval/recovered-accuracy.json").read_text())["results"]["arc_easy"]
    assert acc["n"] == 24 and (here / "eval/recovered.json").read_bytes() == meas
    again = json.loads((here / "done.json").read_text())
    assert again["accuracy_items"] == "accuracy" and again["concurrent_runs"] == 3  # how it was trained, kept
    assert json.loads((elsewhere / "done.json").read_text())["accuracy_items"] == "measures"
    assert study.plan(study.StudyConfig.from_yaml(study_yaml), ["tiny/noise-all/svd-only"])[0].status() == "done"


def test_again_runs_a_finished_run_from_its_start_and_keeps_the_earlier_result(study_yaml, monkeypatch, capsys):
    """``--again``: a finished run (its adapter on a machine that is gone) is trained and evaluated anew
    on the same held-out set and plan; what it made before moves to earlier/1/ here and in the mirror;
    the command repeated after an interruption resumes instead of starting over."""
    d = yaml.safe_load(study_yaml.read_text())
    d.update(mirror="mirror")
    study_yaml.write_text(yaml.safe_dump(d))
    t, name = study_yaml.parent, "tiny/noise-all/kv"
    assert main(["study", "--config", str(study_yaml), "--only", name, "tiny/noise-all/svd-only"]) == 0
    run, mirror = t / "study/tiny/noise-all/kv", t / "mirror/tiny/noise-all/kv"
    first = (run / "done.json").read_bytes()
    calls = []
    real = study.run.run_recover
    monkeypatch.setattr(study.run, "run_recover", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert main(["study", "--config", str(study_yaml), "--only", "tiny/*/svd-only", "--again", name, "--dry-run"]) == 0
    assert not calls and (run / "done.json").read_bytes() == first  # a dry run moves nothing
    assert main(["study", "--config", str(study_yaml), "--only", "tiny/*/svd-only", "--again", name]) == 0
    assert len(calls) == 1 and (run / "adapter").is_dir()  # trained anew (selected though --only leaves it out)
    assert (run / "earlier/1/done.json").read_bytes() == first == (mirror / "earlier/1/done.json").read_bytes()
    assert (run / "earlier/1/eval/recovered.json").exists() and not (run / "earlier/1/heldout").exists()
    again, before = (json.loads((f / "done.json").read_text()) for f in (run, run / "earlier/1"))
    assert again["heldout_digest"] == before["heldout_digest"]  # the same held-out sequences
    assert again["heldout"]["after"]["kl"] == pytest.approx(before["heldout"]["after"]["kl"], rel=1e-5)
    for f in (run, mirror):  # as if the second call was cut short after training (done.json is written last)
        (f / "done.json").unlink()
    assert main(["study", "--config", str(study_yaml), "--only", "tiny/*/svd-only", "--again", name]) == 0
    assert len(calls) == 1 and not (run / "earlier/2").exists() and (run / "done.json").exists()  # resumed
    # the attempt set aside is time spent twice: RESULTS.md counts it with the work lost to a machine
    (run / "earlier/1/timing.json").write_text(json.dumps({"recover_cpu": 7200.0, "eval_cpu": 3600.0}))
    assert main(["study", "--config", str(study_yaml), "--results-only"]) == 0
    assert "(runs started over, pools made again): 3.0 CPU-hours" in (t / "RESULTS.md").read_text()
    capsys.readouterr()
    assert main(["study", "--config", str(study_yaml), "--again", "tiny/nothing"]) == 2
    assert "--again ['tiny/nothing'] selects no run" in capsys.readouterr().err


def test_reference_answers_made_again_are_checked_against_the_kept_evaluation(study_yaml):
    """On a fresh machine the reference's answers are kept again (they are not mirrored): its kept
    evaluation stays as it was, and a comparison, choice by choice, is appended to the recheck file:
    all the same when nothing changed, one item in n apart when the kept choices differ on one."""
    import shutil

    from recover_lora.study.run import recheck_reference, reference_answers

    cfg = study.StudyConfig.from_yaml(study_yaml)
    load = RecoverConfig.from_dict(cfg.recover).load
    ref, tok = load_model(cfg.models["tiny"], load), load_tokenizer(cfg.models["tiny"], load)
    ecfg = study.eval_config(cfg)
    folder = study_yaml.parent / "refeval"
    folder.mkdir()
    answers, results_path = folder / "reference-answers.pt", folder / "reference.json"
    reference_answers(answers, ref, tok, ecfg, results_path, progress=False)
    kept = results_path.read_text()
    recheck = folder / "reference-recheck.json"
    assert answers.exists() and not recheck.exists()
    answers.unlink()  # a fresh machine
    reference_answers(answers, ref, tok, ecfg, results_path, progress=False)
    assert results_path.read_text() == kept
    (first,) = json.loads(recheck.read_text())
    assert first["tasks"]["arc_easy"]["same_pred"] == 1.0 and first["tasks"]["arc_easy"]["n"] == 24
    assert first["tasks"]["arc_easy"]["items_now"]["pred"] == json.loads(kept)["results"]["arc_easy"]["items"]["pred"]
    old = json.loads(kept)
    pred = old["results"]["arc_easy"]["items"]["pred"]
    old["results"]["arc_easy"]["items"]["pred"] = str((int(pred[0]) + 1) % 4) + pred[1:]
    results_path.write_text(json.dumps(old))
    entry = recheck_reference(results_path, json.loads(kept)["results"], 1.0)
    assert entry["tasks"]["arc_easy"]["same_pred"] == pytest.approx(23 / 24, abs=1e-5)
    assert len(json.loads(recheck.read_text())) == 2
    # RESULTS.md's time line counts the evaluations made again (the recheck's entries) with the others
    shutil.copytree(folder, study_yaml.parent / "study/tiny/eval")
    line = results.cpu_used(study_yaml.parent / "study", {("tiny", "noise-all"): {"runs": {}}}, "tiny")
    spent = json.loads(kept)["seconds"] + first["seconds"] + 1.0
    assert f"evaluations {spent / 60:.1f} minutes (wall)" in line


def test_time_of_an_attempt_that_left_nothing_is_not_the_runs_cost(study_yaml):
    """A run whose earlier attempt left its time on record but nothing else (a fresh machine seeded
    from the mirror: no checkpoint, no evaluation part) counts only the attempt that made it; the
    lost seconds are kept apart. With a checkpoint the earlier time is the run's (it resumes)."""
    from recover_lora.study.run import write_off_lost

    d = yaml.safe_load(study_yaml.read_text())
    d.update(sweep=None, plan={"tiny": {"damages": ["noise-all"], "methods": ["kv"]}})
    study_yaml.write_text(yaml.safe_dump(d))
    kv = study_yaml.parent / "study/tiny/noise-all/kv"
    kv.mkdir(parents=True)
    (kv / "timing.json").write_text(json.dumps({"recover": 600.0, "recover_cpu": 590.0, "eval": 60.0, "eval_cpu": 50.0}))
    pool = study_yaml.parent / "study/tiny/timing.json"  # the shared pool, made before on a machine gone
    pool.write_text(json.dumps({"synth_pool": 1000.0, "synth_pool_cpu": 900.0}))
    assert main(["study", "--config", str(study_yaml)]) == 0
    t = json.loads((kv / "timing.json").read_text())
    assert (t["recover_lost"], t["recover_cpu_lost"], t["eval_lost"], t["eval_cpu_lost"]) == (600.0, 590.0, 60.0, 50.0)
    p = json.loads(pool.read_text())
    assert (p["synth_pool_lost"], p["synth_pool_cpu_lost"]) == (1000.0, 900.0) and 0 < p["synth_pool"] < 1000
    done = json.loads((kv / "done.json").read_text())
    assert 0 < done["cpu_minutes"]["recover"] < 590 / 60 and done["cpu_minutes"]["eval"] < 50 / 60
    assert main(["study", "--config", str(study_yaml), "--results-only"]) == 0
    assert "Lost to work a machine took with it (runs started over, pools made again): 0.4 CPU-hours." in \
        (study_yaml.parent / "RESULTS.md").read_text()  # (590 + 50 + 900) CPU seconds
    f = study_yaml.parent / "t.json"
    f.write_text(json.dumps({"recover": 5.0, "recover_cpu": 4.0}))
    write_off_lost(f, "recover", kept=True)  # a checkpoint is there: the run resumes, its time stays
    assert json.loads(f.read_text()) == {"recover": 5.0, "recover_cpu": 4.0}


def test_another_study_beside_this_one(study_yaml):
    """`beside:` puts another study's runs of the same model, damage and method beside this one's:
    each cell this / that, from the two studies' done files (here: the same runs with 1 step of
    training instead of 3, and no svd-only)."""
    t = study_yaml.parent
    d = yaml.safe_load(study_yaml.read_text())
    other = {**d, "study_dir": "other", "results": "OTHER.md", "sweep": None,
             "methods": {"kv": d["methods"]["kv"]}, "goals": {**d["goals"], "method": "kv"}}
    other["recover"] = {**d["recover"], "distill": {**d["recover"]["distill"], "steps": 1}}
    (t / "other.yaml").write_text(yaml.safe_dump(other))
    assert main(["study", "--config", str(t / "other.yaml")]) == 0
    assert main(["study", "--config", str(study_yaml)]) == 0
    assert "## Beside" not in (t / "RESULTS.md").read_text()  # not asked for
    study_yaml.write_text(yaml.safe_dump({**d, "beside": "missing.yaml"}))
    assert main(["study", "--config", str(study_yaml), "--results-only"]) == 0  # a missing one: left out, no error
    assert "## Beside" not in (t / "RESULTS.md").read_text()
    study_yaml.write_text(yaml.safe_dump({**d, "beside": "other.yaml"}))
    assert main(["study", "--config", str(study_yaml), "--results-only"]) == 0
    res = (t / "RESULTS.md").read_text()
    sec = res.split("## Beside: `other.yaml` (CPU)")[1].split("\n## ")[0]
    assert "(OTHER.md)" in sec and "There: every item a task, 1 steps." in sec
    assert "![beside](results/beside-other.png)" in sec and (t / "results/beside-other.png").stat().st_size > 0
    rows = {ln.split(" | ")[2]: ln.split(" | ")[3:] for ln in sec.splitlines() if ln.startswith("| tiny |")}
    assert list(rows) == ["degraded", "kv"]  # svd-only and the sweep's run are not in the other study

    def done(root, m):
        return json.loads((t / root / "tiny/noise-all" / m / "done.json").read_text())

    from recover_lora.study.config import kl_closed, pct

    here, there = done("study", "kv"), done("other", "kv")
    assert rows["kv"][0] == f"{pct(kl_closed(here))} / {pct(kl_closed(there))}"
    assert rows["kv"][1] == f"{100 * here['agreement']:.1f}% / {100 * there['agreement']:.1f}%"
    assert rows["kv"][3] == "384 / 128"  # 3 and 1 steps of 8 x 16 tokens
    assert kl_closed(here) != kl_closed(there)  # two different runs, in their own columns
    a, b = rows["degraded"][1].split(" / ")
    assert a == b and a.endswith("%")  # the same degraded model, evaluated by each study
