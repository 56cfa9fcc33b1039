"""diagnose + auto placement on tiny models: planted NaNs, planted damage, budget, PEFT round trip, CLI."""

import copy
import json

import pytest
import torch
from peft import PeftModel
from tiny import tiny_model, tiny_tokenizer

from recover_lora.degrade import DegradeConfig, NoiseOp, degrade
from recover_lora.diagnose import DiagnoseConfig, diagnose, to_markdown
from recover_lora.provenance import zero_nonfinite
from recover_lora.forward import trainable_parameters
from recover_lora.adapters import attach
from recover_lora.placement import (AdapterPlan, auto_placement, lora_parameters,
                                    preset_budget)

FAST = DiagnoseConfig(sequences=8, seq_len=24)


@pytest.fixture(scope="module")
def ref():
    return tiny_model("llama", initializer_range=0.2, num_hidden_layers=3)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_names_planted_nan_and_ranks_its_layer_first(ref, tok):
    deg = copy.deepcopy(ref)
    with torch.no_grad():
        deg.model.layers[1].mlp.down_proj.weight[3, 5] = float("nan")
    before = _state(deg)
    d = diagnose(ref, deg, tok, FAST)
    assert d["nonfinite"] == {"model.layers.1.mlp.down_proj.weight": {"nan": 1, "inf": 0}}
    assert d["ranking"][0] == 1
    assert d["functional"]["base"]["finite"] is False and d["functional"]["base"]["kl"] is None
    layer1 = d["layers"][1]
    assert layer1["nan"] == 1 and layer1["kl_reduction"] == "inf"  # restoring it makes the output finite
    assert "model.layers.1.mlp.down_proj.weight" in to_markdown(d)
    json.loads(json.dumps(d), parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    from recover_lora.placement import recommend

    assert list(recommend(d, deg, FAST).ranks)[0] == "model.layers.1.mlp.down_proj"
    # the functional measurements left the degraded model exactly as it was (NaN included)
    after = _state(deg)
    assert all(torch.equal(before[k].nan_to_num(7.0), after[k].nan_to_num(7.0)) for k in before)
    assert zero_nonfinite(deg) == {"model.layers.1.mlp.down_proj.weight": 1}
    assert torch.isfinite(deg.model.layers[1].mlp.down_proj.weight).all()


def test_planted_attention_damage_gets_the_adapters(ref, tok, tmp_path):
    deg = copy.deepcopy(ref)
    degrade(deg, DegradeConfig(ops=[NoiseOp(rel=0.3)], seed=0, layers=[1], modules=["attn"]))
    d = diagnose(ref, deg, tok, FAST)
    for name, e in d["modules"].items():
        planted = ".layers.1.self_attn." in name
        assert (e["rel_l2"] > 0.29) if planted else (e["rel_l2"] == 0 and e["max_abs"] == 0), name
    assert d["ranking"] == [1]
    assert d["layers"][1]["kl_reduction"] > 0 and d["layers"][0]["kl_reduction"] == 0.0
    assert d["layers"][1]["restore"]["kl"] == pytest.approx(0.0, abs=1e-6)

    plan = auto_placement(d, deg, rank=8)
    assert plan.ranks and all(".layers.1.self_attn." in n for n in plan.ranks)
    assert len(plan.ranks) == 4
    budget = preset_budget(deg, 8)
    assert plan.budget == budget and plan.parameters <= budget
    assert plan.parameters == lora_parameters(deg, plan.ranks)

    # PEFT: the plan attaches with its per-module ranks, saves, and reloads to identical logits
    student = attach(copy.deepcopy(deg), plan, seed=0)
    assert trainable_parameters(student) == plan.parameters <= budget
    for n, r in plan.ranks.items():
        lora = student.get_submodule("base_model.model." + n)
        assert lora.r["default"] == r and lora.scaling["default"] == pytest.approx(plan.alpha_ratio)
    with torch.no_grad():  # non-zero B so that the adapter changes the output
        for n, p in student.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    student.save_pretrained(str(tmp_path / "adapter"))
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert len(saved["rank_pattern"]) == 4
    ids = torch.randint(4, 128, (2, 12))
    with torch.no_grad():
        want = student(input_ids=ids).logits
        reloaded = PeftModel.from_pretrained(copy.deepcopy(deg), str(tmp_path / "adapter"))
        got = reloaded(input_ids=ids).logits
        base = deg(input_ids=ids).logits
    assert torch.equal(want, got)
    assert not torch.allclose(want, base)

    # dict round trip
    assert AdapterPlan.from_dict(json.loads(json.dumps(plan.to_dict()))).ranks == plan.ranks


def test_budget_is_respected_when_everything_is_damaged(ref, tok):
    deg = copy.deepcopy(ref)
    degrade(deg, DegradeConfig(ops=[NoiseOp(rel=0.2)], seed=1))
    d = diagnose(ref, deg, tok, FAST)
    assert all(L["damaged"] for L in d["layers"])
    assert all("kl_reduction" in G for L in d["layers"] for g, G in L["groups"].items() if g != "other")
    for budget in (None, 3000, 500):
        plan = auto_placement(d, deg, rank=8, budget=budget)
        limit = preset_budget(deg, 8) if budget is None else budget
        assert 0 < plan.parameters <= limit
        student = attach(copy.deepcopy(deg), plan)
        assert trainable_parameters(student) == plan.parameters
    small = auto_placement(d, deg, rank=8, budget=500)
    assert len(small.ranks) < len(d["modules"])  # the budget leaves the least damaged modules out


def test_cli_writes_table_json_png(ref, tok, tmp_path):
    from recover_lora.cli import main
    from recover_lora.load import save_model_dir

    deg = copy.deepcopy(ref)
    degrade(deg, DegradeConfig(ops=[NoiseOp(rel=0.3)], seed=0, layers=[2], modules=["mlp"]))
    save_model_dir(ref, tmp_path / "ref", tok)
    save_model_dir(deg, tmp_path / "deg", tok)
    assert main(["diagnose", "--reference", str(tmp_path / "ref"), "--degraded", str(tmp_path / "deg"),
                 "--out-dir", str(tmp_path / "diag"), "--diagnose.sequences", "4", "--diagnose.seq-len", "16",
                 "--load.device", "cpu", "--diagnose.rank", "8"]) == 0
    out = tmp_path / "diag"
    d = json.loads((out / "diagnosis.json").read_text())
    assert d["ranking"] == [2]
    assert set(json.loads((out / "plan.json").read_text())["layers"]) == {2}
    md = (out / "diagnosis.md").read_text()
    assert "| 2 |" in md and "Recommended placement" in md
    assert (out / "diagnosis.png").stat().st_size > 1000
    assert not (out / ".diagnosis.partial.json").exists()  # kept only until the diagnosis is written


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma3"])
def test_restorations_start_at_the_restored_layer_and_equal_the_full_forward(kind):
    """diagnose runs a restoration of layer i from the degraded model's input to layer i (the layers
    before it are unchanged): the same KL as the full forward, on each architecture (Gemma's and
    Qwen's per-layer attention types follow the cut)."""
    import copy

    from recover_lora.degrade import DegradeConfig, degrade, parse_op
    from recover_lora.diagnose import restored
    from recover_lora.kl import KLMeter
    from tiny import tiny_model

    ref = tiny_model(kind, num_hidden_layers=4, initializer_range=0.2,
                     **({"layer_types": ["sliding_attention", "full_attention"] * 2} if kind == "gemma3" else {}))
    deg = copy.deepcopy(ref)
    degrade(deg, DegradeConfig(ops=[parse_op("noise:rel=0.3")]))
    ids = torch.randint(4, 100, (6, 24), generator=torch.Generator().manual_seed(0))
    kl = KLMeter(ref, ids, batch_size=4, cache=True)
    kl.keep_inputs()
    base = kl(deg)
    assert base == kl(deg)  # the recording pass is an ordinary pass
    names = lambda i: [n for n, _ in deg.named_parameters() if f"layers.{i}." in n]  # noqa: E731
    for i in range(4):
        fast = restored(deg, ref, names(i), lambda: kl(deg, start=i))
        full = restored(deg, ref, names(i), lambda: kl(deg))
        assert fast["kl"] == pytest.approx(full["kl"], rel=1e-5, abs=1e-7) and fast["kl"] < base["kl"]
        assert fast["top1"] == pytest.approx(full["top1"])
    if kind == "gemma3":
        assert ref.config.layer_types == deg.config.layer_types == ["sliding_attention", "full_attention"] * 2


def test_cached_reference_probabilities_give_the_same_kl(monkeypatch):
    """The pass that reads the reference's cached probabilities equals the chunked full-vocabulary KL
    (the one recover measures with)."""
    import copy

    from recover_lora import kl as dg
    from recover_lora.degrade import DegradeConfig, degrade, parse_op
    from tiny import tiny_model

    ref = tiny_model("llama", initializer_range=0.2)
    deg = copy.deepcopy(ref)
    degrade(deg, DegradeConfig(ops=[parse_op("noise:rel=0.3")]))
    ids = torch.randint(4, 100, (5, 20), generator=torch.Generator().manual_seed(1))
    cached = dg.KLMeter(ref, ids, batch_size=2, cache=True)
    monkeypatch.setattr(dg, "CACHE_BYTES", 0)
    plain = dg.KLMeter(ref, ids, batch_size=2, cache=True)
    assert cached.t_cache is not None and plain.t_cache is None
    a, b = cached(deg), plain(deg)
    assert a["kl"] == pytest.approx(b["kl"], rel=1e-5) and a["top1"] == b["top1"] and a["kl"] > 0
    assert cached(ref)["kl"] == pytest.approx(0.0, abs=1e-6)


def test_an_interrupted_diagnosis_resumes_equal_to_an_uninterrupted_one(ref, tok, tmp_path, monkeypatch):
    """The partial file keeps each measured layer; a diagnosis interrupted in layer 2 continues there
    (layers 0-1 not measured again) and ends equal to one never interrupted; a partial made for other
    tokens is not reused."""
    from recover_lora import diagnose as dg

    deg = copy.deepcopy(ref)
    degrade(deg, DegradeConfig(ops=[NoiseOp(rel=0.3)], seed=0))
    ids = torch.randint(4, 100, (8, 24), generator=torch.Generator().manual_seed(0))
    cfg = DiagnoseConfig(sequences=8, seq_len=24, per_group=True)
    whole = diagnose(ref, deg, tok, cfg, heldout_ids=ids)

    part = tmp_path / ".diagnosis.partial.json"
    real, calls, stop = dg.restored, [], [True]

    def interrupted(model, reference, names, measure):
        calls.append(names[0])
        if stop[0] and len(calls) > 6:  # layers 0 and 1 (each: the layer, attention, MLP), then a stop in layer 2
            raise KeyboardInterrupt
        return real(model, reference, names, measure)

    monkeypatch.setattr(dg, "restored", interrupted)
    with pytest.raises(KeyboardInterrupt):
        diagnose(ref, copy.deepcopy(deg), tok, cfg, heldout_ids=ids, partial=part)
    assert set(json.loads(part.read_text())["layers"]) == {"0", "1"}

    calls.clear()
    stop[0] = False
    resumed = diagnose(ref, deg, tok, cfg, heldout_ids=ids, partial=part)
    assert all(".layers.2." in n for n in calls) and len(calls) == 3  # only layer 2 measured again
    assert resumed["functional"].pop("resumed_layers") == 2 and "resumed_layers" not in whole["functional"]
    assert resumed["functional"].pop("forward_passes") < whole["functional"].pop("forward_passes")
    strip = lambda d: {k: v for k, v in d.items() if k != "seconds"}  # noqa: E731
    assert json.dumps(strip(resumed), sort_keys=True) == json.dumps(strip(whole), sort_keys=True)

    calls.clear()
    other = torch.randint(4, 100, (8, 24), generator=torch.Generator().manual_seed(1))
    diagnose(ref, deg, tok, cfg, heldout_ids=other, partial=part)
    assert len(calls) == 9  # other tokens: every layer measured again


def test_a_diagnosis_resumed_after_an_infinite_reduction_equals_an_uninterrupted_one(ref, tok, tmp_path, monkeypatch):
    """A NaN weight: restoring its layer turns the output finite, an infinite KL reduction, which the
    partial file keeps (as "inf") through an interruption."""
    from recover_lora import diagnose as dg

    deg = copy.deepcopy(ref)
    degrade(deg, DegradeConfig(ops=[NoiseOp(rel=0.3)], seed=0))
    with torch.no_grad():
        deg.model.layers[1].mlp.down_proj.weight[3, 5] = float("nan")
    ids = torch.randint(4, 100, (8, 24), generator=torch.Generator().manual_seed(0))
    whole = diagnose(ref, deg, tok, FAST, heldout_ids=ids)
    assert whole["layers"][1]["kl_reduction"] == "inf"
    part, real, n = tmp_path / "p.json", dg.restored, [0]

    def interrupted(*a):
        n[0] += 1
        if n[0] == 7:  # in layer 2, after layers 0 and 1
            raise KeyboardInterrupt
        return real(*a)

    monkeypatch.setattr(dg, "restored", interrupted)
    with pytest.raises(KeyboardInterrupt):
        diagnose(ref, deg, tok, FAST, heldout_ids=ids, partial=part)
    assert json.loads(part.read_text())["layers"]["1"]["kl_reduction"] == float("inf")
    resumed = diagnose(ref, deg, tok, FAST, heldout_ids=ids, partial=part)
    for d in (resumed, whole):
        d.pop("seconds")
        d["functional"].pop("forward_passes")
    assert resumed["functional"].pop("resumed_layers") == 2
    assert json.dumps(resumed, sort_keys=True) == json.dumps(whole, sort_keys=True)
