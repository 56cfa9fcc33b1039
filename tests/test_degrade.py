"""Tests for the degrade stage on tiny Llama-, Qwen2- and Gemma3-shaped models."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tiny import tiny_model, tiny_tokenizer

from recover_lora import degrade as D
from recover_lora.load import load_model
from recover_lora.modules import select_modules
from recover_lora.utils import RecoverLoraError

KINDS = ["llama", "qwen2", "gemma3"]
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def weight_name(module_name: str) -> str:
    return module_name + ".weight"


def popcount_diff(a: torch.Tensor, b: torch.Tensor) -> int:
    """Number of differing bits between two tensors of the same float dtype."""
    int_dtype = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[a.dtype]
    width = 32 if int_dtype == torch.int32 else 16
    x = (a.contiguous().view(int_dtype) ^ b.contiguous().view(int_dtype)).to(torch.int64) & ((1 << width) - 1)
    return int(sum(((x >> i) & 1).sum().item() for i in range(width)))


def run(model, spec: str, seed: int = 0, **kw) -> D.DamageRecord:
    return D.degrade(model, D.DegradeConfig(ops=D.parse_damage(spec), seed=seed, **kw))


# --------------------------------------------------------------------------- targets / noise


@pytest.mark.parametrize("kind", KINDS)
def test_noise_hits_relative_l2_and_spares_the_rest(kind):
    model = tiny_model(kind)
    before = snapshot(model)
    rec = run(model, "noise:rel=0.1", seed=1)
    after = model.state_dict()
    targeted = {weight_name(n) for n in rec.modules}
    assert len(rec.modules) == 7 * model.config.num_hidden_layers
    assert all(n.rsplit(".", 1)[-1] in LINEARS for n in rec.modules)
    for name, w0 in before.items():
        w1 = after[name]
        if name in targeted:
            rel = ((w1.double() - w0.double()).norm() / w0.double().norm()).item()
            assert abs(rel - 0.1) < 1e-4, (name, rel)
            assert abs(rec.modules[name[: -len(".weight")]]["rel_l2"] - rel) < 1e-6
        else:  # embeddings, lm_head, norms, biases: untouched
            assert torch.equal(w0, w1), name
    assert abs(rec.totals["rel_l2"] - 0.1) < 1e-4
    assert rec.totals["n_modules"] == len(rec.modules)


def test_seed_reproducible():
    a, b, c = tiny_model("llama"), tiny_model("llama"), tiny_model("llama")
    spec = "noise:rel=0.05;bitflip:n=20,bits=mantissa;rtn:bits=4,group=16,modules=mlp"
    ra, rb = run(a, spec, seed=7), run(b, spec, seed=7)
    run(c, spec, seed=8)
    for (k, va), vb, vc in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(va.view(torch.int32), vb.view(torch.int32)), k  # bit-identical
    assert any(not torch.equal(va, vc) for va, vc in zip(a.state_dict().values(), c.state_dict().values()))
    assert ra.modules == rb.modules
    # The per-module seed comes from a stable hash, not Python's salted hash().
    assert D.stable_seed(7, 0, "model.layers.0.mlp.up_proj") == D.stable_seed(7, 0, "model.layers.0.mlp.up_proj")
    assert D.stable_seed(1, 0, "x") == 6469694515460092460


def test_layer_subset_and_presets():
    model = tiny_model("qwen2", num_hidden_layers=4)
    before = snapshot(model)
    rec = run(model, "noise:rel=0.2,modules=kv,layers=1-2")
    assert sorted(rec.modules) == [f"model.layers.{i}.self_attn.{p}" for i in (1, 2) for p in ("k_proj", "v_proj")]
    after = model.state_dict()
    for name, w0 in before.items():
        assert torch.equal(w0, after[name]) == (name[: -len(".weight")] not in rec.modules), name

    names = lambda **kw: [n for n, _ in select_modules(model, **kw)]  # noqa: E731
    assert names(modules=["attn"], layers=[0]) == [f"model.layers.0.self_attn.{p}" for p in LINEARS[:4]]
    assert names(modules=["mlp"], layers=[3]) == [f"model.layers.3.mlp.{p}" for p in LINEARS[4:]]
    assert names(modules=["re:layers\\.[02]\\..*q_proj"]) == ["model.layers.0.self_attn.q_proj",
                                                              "model.layers.2.self_attn.q_proj"]
    assert names(modules=["self_attn.o_proj"], layers=[0, 3]) == ["model.layers.0.self_attn.o_proj",
                                                                 "model.layers.3.self_attn.o_proj"]
    assert "lm_head" not in names(modules=["lm_head"])  # tied embedding spared by default
    assert names(modules=["lm_head"], include_embeddings=True) == ["lm_head"]
    assert D.parse_layers("0-2,5+7") == [0, 1, 2, 5, 7]
    with pytest.raises(RecoverLoraError, match="out of range"):
        run(tiny_model("llama"), "noise:rel=0.1,layers=0-9")
    with pytest.raises(RecoverLoraError, match="matches no module"):
        run(tiny_model("llama"), "noise:rel=0.1,modules=nonexistent_proj")


# --------------------------------------------------------------------------- rtn


@pytest.mark.parametrize("symmetric", [True, False])
def test_rtn_levels_per_group_and_error_shrinks(symmetric):
    errs = []
    group = 16  # hidden 32 -> 2 groups per row; down_proj has 64 inputs -> 4 groups
    for bits in (2, 3, 4, 6, 8):
        model = tiny_model("llama")
        before = snapshot(model)
        rec = run(model, f"rtn:bits={bits},group={group},{'sym' if symmetric else 'asym'}")
        after = model.state_dict()
        for name in rec.modules:
            w = after[weight_name(name)]
            groups = w.reshape(w.shape[0], -1, group)
            for r in range(groups.shape[0]):
                for g in range(groups.shape[1]):
                    assert groups[r, g].unique().numel() <= 2 ** bits
        errs.append(rec.totals["rel_l2"])
        assert all(not torch.equal(before[weight_name(n)], after[weight_name(n)]) for n in rec.modules)
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 0.01


def test_rtn_ragged_last_group():
    model = tiny_model("llama")
    rec = run(model, "rtn:bits=2,group=24,modules=q_proj")  # 32 inputs -> groups of 24 and 8
    w = model.state_dict()[weight_name(next(iter(rec.modules)))]
    assert all(w[r, :24].unique().numel() <= 4 and w[r, 24:].unique().numel() <= 4 for r in range(w.shape[0]))


# --------------------------------------------------------------------------- dtype


def test_fp16_overflow_clamps():
    model = tiny_model("llama")
    w = model.model.layers[0].mlp.up_proj.weight
    with torch.no_grad():
        w[0, 0] = 1e6
        w[1, 1] = -1e6
        w[2, 2] = 65519.0  # rounds to 65504 in fp16 anyway
    ref = w.detach().clone()
    rec = run(model, "dtype:fp16,modules=up_proj,layers=0")
    assert w[0, 0].item() == 65504.0 and w[1, 1].item() == -65504.0 and w[2, 2].item() == 65504.0
    assert torch.isfinite(w).all()
    mask = ref.abs() < 65504
    assert torch.equal(w[mask], ref[mask].half().float()[...])
    assert rec.modules["model.layers.0.mlp.up_proj"]["max_abs"] == pytest.approx(1e6 - 65504)


@pytest.mark.parametrize("fmt", ["bf16", "fp8", "fp8_e5m2"])
def test_dtype_round_trips_match_torch_casts(fmt):
    model = tiny_model("gemma3")
    before = snapshot(model)
    rec = run(model, f"dtype:{fmt}")
    cast = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}[fmt]
    for name in rec.modules:
        w0, w1 = before[weight_name(name)], model.state_dict()[weight_name(name)]
        assert torch.equal(w1, w0.to(cast).to(torch.float32)), name


def test_fp8_clamp_and_per_tensor_scale():
    model = tiny_model("llama")
    w = model.model.layers[0].self_attn.q_proj.weight
    with torch.no_grad():
        w[0, 0] = 1000.0
    run(model, "dtype:fp8,modules=q_proj,layers=0")
    assert w[0, 0].item() == 448.0
    model = tiny_model("llama")
    w = model.model.layers[0].self_attn.q_proj.weight
    w0 = w.detach().clone()
    rec = run(model, "dtype:fp8,scale=tensor,modules=q_proj,layers=0")
    scale = w0.abs().max() / 448.0
    assert torch.equal(w, (w0 / scale).to(torch.float8_e4m3fn).float() * scale)
    assert w.abs().max().item() == pytest.approx(w0.abs().max().item(), rel=1e-6)
    assert 0 < rec.totals["rel_l2"] < 0.1


# --------------------------------------------------------------------------- bitflip


@pytest.mark.parametrize("field,dtype", [("all", torch.float32), ("exponent", torch.float32),
                                         ("mantissa", torch.bfloat16), ("sign", torch.float32)])
def test_bitflip_flips_exactly_n_bits(field, dtype):
    model = tiny_model("qwen2").to(dtype)
    before = snapshot(model)
    n = 37
    rec = run(model, f"bitflip:n={n},bits={field}", seed=3)
    after = model.state_dict()
    flipped = sum(popcount_diff(before[k], after[k]) for k in before)
    assert flipped == n
    assert rec.totals["flips"] == n == sum(e["flips"] for e in rec.modules.values())
    per_module = {m: popcount_diff(before[weight_name(m)], after[weight_name(m)]) for m in rec.modules}
    assert per_module == {m: e["flips"] for m, e in rec.modules.items()}
    # Only the requested bit field changed.
    width, exp, man = (32, 8, 23) if dtype == torch.float32 else (16, 8, 7)
    allowed = {"all": (1 << width) - 1, "sign": 1 << (width - 1),
               "exponent": ((1 << exp) - 1) << man, "mantissa": (1 << man) - 1}[field]
    int_dtype = torch.int32 if width == 32 else torch.int16
    for m in rec.modules:
        x = (before[weight_name(m)].view(int_dtype) ^ after[weight_name(m)].view(int_dtype)).to(torch.int64)
        assert ((x & ((1 << width) - 1)) & ~allowed).eq(0).all()
    json.dumps(rec.to_dict(), allow_nan=False)  # exponent flips may give inf: still valid JSON


def test_bitflip_rate():
    model = tiny_model("llama")
    before = snapshot(model)
    rec = run(model, "bitflip:rate=1e-3,modules=mlp")
    eligible = sum(before[weight_name(m)].numel() * 32 for m in rec.modules)
    assert rec.totals["flips"] == round(1e-3 * eligible)
    assert sum(popcount_diff(before[k], v) for k, v in model.state_dict().items()) == rec.totals["flips"]


# --------------------------------------------------------------------------- prune


def test_prune_sparsity_and_nm():
    model = tiny_model("llama")
    rec = run(model, "prune:sparsity=0.5")
    for name, e in rec.modules.items():
        w = model.state_dict()[weight_name(name)]
        assert (w == 0).float().mean().item() == pytest.approx(0.5, abs=1e-3)
        assert e["sparsity"] == pytest.approx(0.5, abs=1e-3)
    model = tiny_model("gemma3")
    before = snapshot(model)
    rec = run(model, "prune:nm=2:4")
    for name in rec.modules:
        w0, w = before[weight_name(name)], model.state_dict()[weight_name(name)]
        nz = (w != 0).reshape(w.shape[0], -1, 4).sum(-1)
        assert (nz <= 2).all()
        # The kept entries are the two largest |w| of every group of 4 and keep their value.
        g0 = w0.abs().reshape(w.shape[0], -1, 4)
        kept = (w != 0).reshape_as(g0)
        assert torch.equal(w[w != 0], w0[w != 0])
        assert (g0.masked_fill(~kept, float("inf")).amin(-1) >= g0.masked_fill(kept, -1).amax(-1)).all()
    assert rec.totals["sparsity"] == pytest.approx(0.5)


# --------------------------------------------------------------------------- save / reload / CLI


def test_save_reloads_and_damage_json_valid(tmp_path):
    model = tiny_model("llama")
    rec = run(model, "noise:rel=0.1,modules=attn;prune:sparsity=0.25,modules=mlp,layers=1", seed=5)
    out = D.save_degraded(model, tiny_tokenizer(), rec, tmp_path / "deg")
    assert not (tmp_path / "deg.tmp").exists()
    data = json.loads((out / "damage.json").read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))
    assert data["format"] == D.RECORD_FORMAT and data["seed"] == 5
    assert [o["op"]["kind"] for o in data["ops"]] == ["noise", "prune"]
    assert data["modules"]["model.layers.0.self_attn.q_proj"]["rel_l2"] == pytest.approx(0.1, abs=1e-4)
    cfg = D.DegradeConfig.from_dict(data["config"])
    assert cfg.to_dict() == rec.config
    reloaded = load_model(str(out))
    for (k, v), v2 in zip(model.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(v, v2), k
    # Re-running the recorded config on a fresh model reproduces the weights bit for bit.
    fresh = tiny_model("llama")
    D.degrade(fresh, cfg)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
    with pytest.raises(RecoverLoraError, match="already exists"):
        D.save_degraded(model, None, rec, out)
    D.save_degraded(model, None, rec, out, overwrite=True)
    assert (out / "damage.json").exists() and not (tmp_path / "deg.old").exists()


def test_cli_degrade(tmp_path, capsys):
    src = tmp_path / "ref"
    D.save_degraded(tiny_model("gemma3"), tiny_tokenizer(), {"note": "source"}, src)
    from recover_lora.cli import main

    assert main(["degrade", "--model", str(src), "--out-dir", str(tmp_path / "out"), "--seed", "2", "--damage",
                 "noise:rel=0.1", "rtn:bits=4,group=16", "--modules", "attn", "--layers", "1",
                 "--load.device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "q_proj" in text and "gate_proj" not in text and "mean relL2" in text
    data = json.loads((tmp_path / "out" / "damage.json").read_text())
    assert sorted(data["modules"]) == [f"model.layers.1.self_attn.{p}" for p in ("k_proj", "o_proj", "q_proj",
                                                                                 "v_proj")]
    assert data["config"]["layers"] == [1] and len(data["ops"]) == 2


# --------------------------------------------------------------------------- spec parser


@pytest.mark.parametrize("spec,token", [
    ("nosie:rel=0.1", "nosie"),
    ("noise:rel=abc", "rel=abc"),
    ("noise:rel=0.1,foo=2", "foo=2"),
    ("noise:rel=0.1,junk", "junk"),
    ("rtn:bits=9", "bits"),
    ("rtn:bits=3,group=x", "group=x"),
    ("dtype:fp4", "fp4"),
    ("bitflip:n=3,bits=middle", "bits=middle"),
    ("prune:nm=2-4", "nm=2-4"),
    ("noise:rel=0.1,layers=1-x", "layers=1-x"),
    ("noise", "rel="),
    ("prune:sparsity=0.5,nm=2:4", "exactly one"),
])
def test_spec_errors_name_the_bad_token(spec, token):
    with pytest.raises(RecoverLoraError) as e:
        D.parse_damage(spec)
    assert token in str(e.value)


def test_spec_parses():
    ops = D.parse_damage(["noise:rel=0.1;rtn:bits=3,group=128,modules=mlp,asym", "dtype:fp8",
                          "bitflip:n=10,bits=exponent", "prune:nm=2:4,layers=0-2,5,modules=q_proj,v_proj"])
    assert [type(o) for o in ops] == [D.NoiseOp, D.RtnOp, D.DtypeOp, D.BitflipOp, D.PruneOp]
    assert ops[0].rel == 0.1 and ops[0].modules is None
    assert (ops[1].bits, ops[1].group, ops[1].symmetric, ops[1].modules) == (3, 128, False, ["mlp"])
    assert ops[2].format == "fp8" and not ops[2].per_tensor_scale
    assert (ops[3].n, ops[3].bits) == (10, "exponent")
    assert ops[4].nm == [2, 4] and ops[4].layers == [0, 1, 2, 5] and ops[4].modules == ["q_proj", "v_proj"]
    assert D.parse_op("prune:sparsity=0.5").sparsity == 0.5
    assert all(D.op_from_dict(o.to_dict()) == o for o in ops)
    assert math.isclose(D.parse_op("noise:rel=1e-2").rel, 0.01)
