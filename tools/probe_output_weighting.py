"""Probe (docs/warm_start.md): does weighting the *output* side of the attention projections help the
EoRA start? The rank-r fix X of dW minimising ||L (dW - X) R||_F is L^-1 U_r U_r^T L dW, U_r the top
left singular vectors of L dW R. Here L weights k_proj rows by the queries that read them (the
RoPE-invariant energy of each rotary pair, summed over the query heads of the KV group), q_proj rows
by the keys, v_proj by o_proj's head block (sqrt of W_o,h^T W_o,h); R is eora's (full) or
eora-diag's (diagonal) input weighting with the *unshrunk* covariance. SmolLM2 only (no q/k norms).
Result: a few percent of held-out KL, less than shrinking the covariance (EORA_SHRINK); not adopted.

    python tools/probe_output_weighting.py "noise:rel=0.2,modules=kv" "noise:rel=0.1"
"""
import copy, math, sys, tempfile, time
import torch
from recover_lora.degrade import DegradeConfig, degrade, parse_op
from recover_lora.distill import attach_adapters
from recover_lora.config import AdapterConfig
from recover_lora.kl import measure
from recover_lora.forward import hidden_states
from recover_lora.load import LoadConfig, load_model, load_tokenizer
from recover_lora.svd_init import input_moments, _root, _lora_layers, truncated_svd
from recover_lora.synth import SynthConfig, load_synthetic, synthesize

torch.manual_seed(0)
lcfg = LoadConfig(dtype="float32", device="cpu")
ref = load_model("smollm2", lcfg).eval().requires_grad_(False)
tok = load_tokenizer("smollm2", lcfg)
ids = {}
with tempfile.TemporaryDirectory() as d:
    for name, n, seed in [("calib", 32, 2), ("heldout", 32, 1)]:
        ids[name] = load_synthetic(synthesize(ref, tok, SynthConfig(num_sequences=n, seq_len=64, seed=seed), f"{d}/{name}", progress=False))
cfgm = ref.config
H, KV = cfgm.num_attention_heads, cfgm.num_key_value_heads
hd = getattr(cfgm, "head_dim", None) or cfgm.hidden_size // H
g = H // KV


@torch.no_grad()
def out_energies(model, calib):
    """per layer: pair energy of q (H*hd) and k (KV*hd) outputs, pre-RoPE (pair energy is RoPE-invariant)."""
    acc = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        for nm in ("q_proj", "k_proj"):
            def f(mod, args, out, key=(i, nm)):
                y = out.detach().float().reshape(-1, out.shape[-1])
                e = (y * y).sum(0)
                acc[key] = acc.get(key, 0) + e
            hooks.append(getattr(layer.self_attn, nm).register_forward_hook(f))
    n = 0
    for j in range(0, len(calib), 8):
        hidden_states(model, calib[j:j + 8]); n += calib[j:j + 8].numel()
    for h in hooks: h.remove()
    out = {}
    for key, e in acc.items():
        e = e / n
        nh = e.numel() // hd
        e = e.view(nh, 2, hd // 2)
        pe = e.mean(1, keepdim=True).expand(nh, 2, hd // 2).reshape(nh, hd)
        out[key] = pe
    return out


def L_for(name, layer_idx, energies, ref, mode):
    """output weighting (vector for diag, or block list for v) of module `name`."""
    if "k_proj" in name and "k" in mode:
        q = energies[(layer_idx, "q_proj")]  # H x hd
        return q.view(KV, g, hd).sum(1).reshape(-1).sqrt()
    if "q_proj" in name and "q" in mode:
        k = energies[(layer_idx, "k_proj")]  # KV x hd
        return k.repeat_interleave(g, 0).reshape(-1).sqrt()
    if "v_proj" in name and "v" in mode:
        Wo = ref.model.layers[layer_idx].self_attn.o_proj.weight.float()  # hidden x H*hd
        blocks = []
        for j in range(KV):
            M = sum(Wo[:, h * hd:(h + 1) * hd].T @ Wo[:, h * hd:(h + 1) * hd] for h in range(j * g, j * g + g))
            blocks.append(M)
        Mfull = torch.block_diag(*blocks)
        ev, evec = torch.linalg.eigh(Mfull)
        ev = ev.clamp_min(ev.max() * 1e-6)
        return (evec * ev.sqrt()) @ evec.T  # symmetric sqrt
    return None


@torch.no_grad()
def init_outw(student, ref, calib, mode, rdiag=False):
    layers = list(_lora_layers(student, "default"))
    mom = input_moments(ref, [n for n, _ in layers], calib, 8, full=not rdiag)
    energies = out_energies(ref, calib)
    roots = {}
    for name, layer in layers:
        m = mom[name]
        if id(m) not in roots:
            roots[id(m)] = m.sqrt() if rdiag else _root(m)
        R = roots[id(m)]
        li = int(name.split("layers.")[1].split(".")[0])
        Lw = L_for(name, li, energies, ref, mode)
        w_deg = layer.get_base_layer().weight.float()
        w_ref = ref.get_submodule(name).weight.float()
        dw = w_ref - w_deg
        A_mod, B_mod = layer.lora_A["default"], layer.lora_B["default"]
        r = A_mod.weight.shape[0]; s = float(layer.scaling["default"])
        Ldw = dw if Lw is None else (Lw[:, None] * dw if Lw.ndim == 1 else Lw @ dw)
        M = Ldw * R if R.ndim == 1 else Ldw @ R
        U, _, _ = truncated_svd(M, r, "full")
        P = U.T @ Ldw  # r x in
        if Lw is None:
            Bdir = U
        elif Lw.ndim == 1:
            Bdir = U / Lw.clamp_min(Lw.max() * 1e-6)[:, None]
        else:
            Bdir = torch.linalg.solve(Lw, U)
        c = (P.norm(dim=1) / Bdir.norm(dim=0).clamp_min(1e-30)).clamp_min(1e-30).sqrt()
        B_mod.weight.copy_(Bdir * c / math.sqrt(s))
        A_mod.weight.copy_(P / c[:, None] / math.sqrt(s))


for spec in sys.argv[1:]:
    deg = copy.deepcopy(ref)
    degrade(deg, DegradeConfig(ops=[parse_op(x) for x in spec.split(";")], seed=0))
    print(spec, "degraded", measure(deg, ref, ids["heldout"], 8), flush=True)
    for init in ["eora", "eora-diag"]:
        st = attach_adapters(copy.deepcopy(deg), AdapterConfig(modules="all-linear", rank=16, alpha=32, init=init), reference=ref,
                              calib_ids=ids["calib"], shrink=0.0)
        print(spec, init, measure(st, ref, ids["heldout"], 8), flush=True)
    for mode, rdiag in [("qkv", False), ("k", False), ("v", False), ("qk", False), ("qkv", True)]:
        t0 = time.time()
        st = attach_adapters(copy.deepcopy(deg), AdapterConfig(modules="all-linear", rank=16, alpha=32, init="default"), reference=ref)
        init_outw(st, ref, ids["calib"], mode, rdiag)
        print(spec, f"outw-{mode}{'-rdiag' if rdiag else ''}", measure(st, ref, ids["heldout"], 8), f"{time.time()-t0:.0f}s", flush=True)
