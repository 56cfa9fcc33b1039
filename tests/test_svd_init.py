import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny import tiny_model

from recover_lora.config import AdapterConfig

from recover_lora.adapters import adapter_targets

from recover_lora.distill import attach_adapters
from recover_lora.svd_init import EORA_SHRINK, SVD_INITS, input_moments, svd_init_, truncated_svd
from recover_lora.utils import RecoverLoraError


def _low_rank_pair(rank: int, seed: int = 0, scale: float = 0.05, kind: str = "llama"):
    """Reference and a degraded copy whose every decoder linear differs by a rank-``rank`` matrix."""
    ref = tiny_model(kind, seed=seed, initializer_range=0.2)
    deg = copy.deepcopy(ref)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, mod in deg.named_modules():
            if isinstance(mod, torch.nn.Linear) and ".layers." in name:
                o, i = mod.weight.shape
                mod.weight += scale * torch.randn(o, rank, generator=g) @ torch.randn(rank, i, generator=g)
    return ref, deg


def _ids(n=4, length=16, seed=0):
    return torch.randint(4, 128, (n, length), generator=torch.Generator().manual_seed(seed))


def _lora_names(model):
    from peft.tuners.lora import LoraLayer
    return [n for n, m in model.get_base_model().named_modules() if isinstance(m, LoraLayer)]


@pytest.mark.parametrize("kind,use_rslora,model", [("svd", False, "llama"), ("svd", True, "llama"),
                                                   ("eora", False, "llama"), ("eora", True, "llama"),
                                                   ("eora-diag", False, "llama"), ("eora", False, "gemma3"),
                                                   ("svd", False, "qwen2"), ("svd", False, "gemma3")])
def test_exact_when_difference_has_rank_at_most_r(kind, use_rslora, model):
    ref, deg = _low_rank_pair(rank=3, kind=model)
    x = _ids()
    with torch.no_grad():
        want = ref(x).logits
        assert (deg(x).logits - want).abs().max() > 1e-2  # the damage is visible
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=adapter_targets(AdapterConfig(modules="all-linear"), deg),
                     use_rslora=use_rslora, task_type="CAUSAL_LM")
    student = get_peft_model(deg, cfg)
    stats = svd_init_(student, ref, kind=kind, calib_ids=_ids(8, 16, seed=1))
    names = _lora_names(student)
    assert set(stats) == set(names) and len(names) == 14
    assert all(s["rel_residual"] < 1e-4 for s in stats.values())
    with torch.no_grad():
        torch.testing.assert_close(student(x).logits, want, atol=1e-4, rtol=1e-4)  # unmerged forward
    merged = student.merge_and_unload()
    ref_sd = ref.state_dict()
    for n in names:
        torch.testing.assert_close(merged.get_submodule(n).weight, ref_sd[f"{n}.weight"], atol=1e-5, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(merged(x).logits, want, atol=1e-4, rtol=1e-4)


def test_best_rank_r_approximation_when_rank_exceeds_r():
    ref, deg = _low_rank_pair(rank=12)
    r = 4
    student = attach_adapters(deg, AdapterConfig(modules="attn-mlp", rank=r, alpha=16, init="svd"), reference=ref)
    for name, layer in zip(_lora_names(student), [student.get_base_model().get_submodule(n)
                                                  for n in _lora_names(student)]):
        w_ref = ref.get_submodule(name).weight
        dw = w_ref - layer.get_base_layer().weight
        s = torch.linalg.svdvals(dw)
        approx = layer.get_delta_weight("default")
        residual = (dw - approx).norm()
        eckart_young = s[r:].square().sum().sqrt()
        torch.testing.assert_close(residual, eckart_young, rtol=1e-4, atol=1e-6)
        assert torch.linalg.matrix_rank(approx, rtol=1e-5) == r
        assert layer.scaling["default"] == 16 / r


def test_rank_pattern_and_stats():
    ref, deg = _low_rank_pair(rank=6)
    targets = adapter_targets(AdapterConfig(modules="attn"), deg)
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=targets, rank_pattern={"k_proj": 6, "v_proj": 8},
                     task_type="CAUSAL_LM")
    student = get_peft_model(deg, cfg)
    stats = svd_init_(student, ref.state_dict())  # a state dict works as the reference too
    for name, st in stats.items():
        short = name.rsplit(".", 1)[-1]
        assert st["rank"] == {"k_proj": 6, "v_proj": 8}.get(short, 2)
        if short in ("k_proj", "v_proj"):
            assert st["rel_residual"] < 1e-4  # rank 6 <= r: exact (r=8 pads with zeros)
        else:
            assert st["rel_residual"] > 1e-2


def test_bf16_base_weights_match_fp32_truncated_svd():
    ref, deg = _low_rank_pair(rank=12)
    deg = deg.to(torch.bfloat16)
    student = attach_adapters(deg, AdapterConfig(modules="kv", rank=4))
    svd_init_(student, ref)
    for name in _lora_names(student):
        layer = student.get_base_model().get_submodule(name)
        dw = ref.get_submodule(name).weight - layer.get_base_layer().weight.float()
        U, S, V = truncated_svd(dw, 4, "full")
        best = U @ torch.diag(S) @ V.T
        approx = (layer.scaling["default"] * layer.lora_B["default"].weight.float()
                  @ layer.lora_A["default"].weight.float())
        assert (approx - best).norm() / best.norm() < 1e-2  # adapter weights are stored in bf16 or fp32


def test_each_init_is_optimal_for_its_own_error():
    """svd minimises the weight error, eora-diag the error weighted by sqrt(E[x_j^2]), eora the output
    error E||(dW - dW_lora) x||^2 under the (shrunk) input covariance; eora reaches the Eckart-Young
    bound of dW R, and at shrink 0 that of plain EoRA (the unshrunk covariance)."""
    ref, deg = _low_rank_pair(rank=12)
    calib = _ids(8, 16, seed=2)
    names = adapter_targets(AdapterConfig(modules="mlp"), deg)
    cov = input_moments(ref, names, calib, full=True)
    diag = input_moments(ref, names, calib, full=False)
    for n in names:  # the diagonal moments are the covariance's diagonal
        torch.testing.assert_close(diag[n], torch.diagonal(cov[n]), rtol=1e-4, atol=1e-6)

    shrunk = {n: (1 - EORA_SHRINK) * cov[n] + EORA_SHRINK * torch.diag(torch.diagonal(cov[n])) for n in names}

    def errors(student):
        e = {"svd": 0.0, "eora-diag": 0.0, "eora": 0.0, "eora-plain": 0.0}
        for n in names:
            layer = student.get_base_model().get_submodule(n)
            res = ref.get_submodule(n).weight - layer.get_base_layer().weight - layer.get_delta_weight("default")
            e["svd"] += res.square().sum().item()
            e["eora-diag"] += (res * diag[n].sqrt()).square().sum().item()
            e["eora"] += torch.trace(res @ shrunk[n] @ res.T).item()
            e["eora-plain"] += torch.trace(res @ cov[n] @ res.T).item()
        return e

    got = {kind: errors(attach_adapters(copy.deepcopy(deg), AdapterConfig(modules="mlp", rank=3, init=kind), reference=ref,
                                         calib_ids=calib)) for kind in SVD_INITS}
    for objective in SVD_INITS:  # (eora-plain is no init's objective here)
        best = min(got, key=lambda k: got[k][objective])
        assert best == objective, (objective, got)
    def bound(covs):
        b = 0.0
        for n in names:
            dw = ref.get_submodule(n).weight - deg.get_submodule(n).weight
            ev, evec = torch.linalg.eigh(covs[n])
            sv = torch.linalg.svdvals(dw @ (evec * ev.clamp_min(0).sqrt()))
            b += sv[3:].square().sum().item()
        return b

    assert got["eora"]["eora"] == pytest.approx(bound(shrunk), rel=1e-3)
    by_shrink = {}
    for shrink in (0.0, 1.0):
        student = attach_adapters(copy.deepcopy(deg), AdapterConfig(modules="mlp", rank=3), reference=ref)
        svd_init_(student, ref, kind="eora", calib_ids=calib, shrink=shrink)
        by_shrink[shrink] = errors(student)
    assert by_shrink[0.0]["eora-plain"] == pytest.approx(bound(cov), rel=1e-3)  # plain EoRA: its own optimum
    assert by_shrink[0.0]["eora-plain"] < got["eora"]["eora-plain"]
    assert by_shrink[1.0]["eora-diag"] == pytest.approx(got["eora-diag"]["eora-diag"], rel=1e-3)  # = eora-diag
    with pytest.raises(RecoverLoraError, match="shrink"):
        svd_init_(student, ref, kind="eora", calib_ids=calib, shrink=1.5)


def test_shared_inputs_share_one_moment():
    """q/k/v (and gate/up) read the same tensor: one covariance, computed once."""
    ref, _ = _low_rank_pair(rank=2)
    names = adapter_targets(AdapterConfig(modules="attn-mlp"), ref)
    m = input_moments(ref, names, _ids(4, 16))
    q, k, v = (f"model.layers.0.self_attn.{x}_proj" for x in "qkv")
    assert m[q] is m[k] is m[v] and m["model.layers.0.mlp.gate_proj"] is m["model.layers.0.mlp.up_proj"]
    assert m[q] is not m["model.layers.0.self_attn.o_proj"] and m[q] is not m["model.layers.0.mlp.gate_proj"]


def test_errors():
    ref, deg = _low_rank_pair(rank=2)
    student = attach_adapters(deg, AdapterConfig(modules="kv", rank=2))
    with pytest.raises(RecoverLoraError, match="unknown svd init"):
        svd_init_(student, ref, kind="nope")
    with pytest.raises(RecoverLoraError, match="calibration"):
        svd_init_(student, ref, kind="eora")
    with pytest.raises(RecoverLoraError, match="no tensor"):
        svd_init_(student, {})


def test_lowrank_path_matches_full_on_low_rank_matrix():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(300, 5, generator=g) @ torch.randn(5, 200, generator=g)
    for method in ("full", "lowrank"):
        U, S, V = truncated_svd(m, 5, method)
        torch.testing.assert_close(U @ torch.diag(S) @ V.T, m, atol=1e-4, rtol=1e-4)


def test_components_the_difference_does_not_fill_stay_trainable():
    """An undamaged module, or ranks beyond rank(dW), keep PEFT's init (A random, B zero): same
    function, and a gradient step moves them (B = A = 0 would never move)."""
    ref = tiny_model("llama", initializer_range=0.2)
    deg = copy.deepcopy(ref)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # rank-2 damage on every k/v but layer 0's k_proj
        for name, mod in deg.named_modules():
            if name.endswith(("k_proj", "v_proj")) and name != "model.layers.0.self_attn.k_proj":
                o, i = mod.weight.shape
                mod.weight += 0.05 * torch.randn(o, 2, generator=g) @ torch.randn(2, i, generator=g)
    student = attach_adapters(deg, AdapterConfig(modules="kv", rank=4, init="svd"), reference=ref)
    x = _ids()
    with torch.no_grad():
        torch.testing.assert_close(student(x).logits, ref(x).logits, atol=1e-4, rtol=1e-4)
    k = student.get_base_model().model.layers[0].self_attn.k_proj
    v = student.get_base_model().model.layers[0].self_attn.v_proj
    assert k.lora_B["default"].weight.abs().max() == 0 and k.lora_A["default"].weight.abs().min() > 0
    assert v.lora_B["default"].weight[:, 2:].abs().max() == 0 and v.lora_A["default"].weight[2:].abs().min() > 0
    student(x).logits.square().mean().backward()
    assert k.lora_B["default"].weight.grad.abs().max() > 0
    assert v.lora_B["default"].weight.grad[:, 2:].abs().max() > 0


def test_cholesky_root_gives_the_eigendecomposition_root_result(monkeypatch):
    # eora takes the Cholesky factor as the covariance root; an eigendecomposition root must give the
    # same adapters, and a semi-definite covariance (a dead channel) must still work, via the fallback.
    import recover_lora.svd_init as si

    pd = torch.tensor([[4.0, 2.0], [2.0, 3.0]])
    torch.testing.assert_close(si._root(pd), torch.linalg.cholesky(pd))
    cov = torch.eye(6)
    cov[2, 2] = 0.0  # not positive definite: Cholesky refuses, the eigendecomposition takes over
    r = si._root(cov)
    torch.testing.assert_close(r @ r.T, cov)

    def eigh_root(cov):
        evals, evecs = torch.linalg.eigh(cov)
        return evecs * evals.clamp_min(0).sqrt()

    ref, deg = _low_rank_pair(rank=8)
    calib = _ids(8, 16)
    results = {}
    for which in ("cholesky", "eigh"):
        if which == "eigh":
            monkeypatch.setattr(si, "_root", eigh_root)
        student = attach_adapters(copy.deepcopy(deg), AdapterConfig(modules="attn-mlp", rank=4))
        svd_init_(student, ref, kind="eora", calib_ids=calib)
        results[which] = {n: m.lora_B["default"].weight @ m.lora_A["default"].weight
                          for n, m in student.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    assert len(results["eigh"]) == 2 * 7
    for n, d in results["eigh"].items():
        torch.testing.assert_close(results["cholesky"][n], d, rtol=1e-3, atol=1e-5)
