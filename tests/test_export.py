"""The llama.cpp GGUF LoRA export: names, shapes, PEFT scaling and the Llama Q/K row order.

The check is independent of the exporter: transformers' own GGUF tensor processors (the code that
undoes llama.cpp's conversion when it loads a GGUF) turn each exported lora_b @ lora_a back into
Hugging Face layout, and that must equal PEFT's delta weight for the module.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

from recover_lora.cli import main
from recover_lora.export import export_gguf_lora
from recover_lora.utils import RecoverLoraError

from tiny import tiny_model

ARCH = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2, "gemma3": gguf.MODEL_ARCH.GEMMA3}


def _fake_base_gguf(path, kind: str, model) -> None:
    """A GGUF with the base model's metadata and tensor names/shapes (zeros): all the exporter reads."""
    cfg = model.config
    w = gguf.GGUFWriter(str(path), kind)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    names = gguf.get_tensor_name_map(ARCH[kind], cfg.num_hidden_layers)
    for name, p in model.named_parameters():
        target = names.get_name(name.removesuffix(".weight"))
        if target is not None and p.dim() == 2:
            w.add_tensor(f"{target}.weight", np.zeros(tuple(p.shape), np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _random_lora(model, **lora_kw):
    peft_model = get_peft_model(model, LoraConfig(**lora_kw))
    torch.manual_seed(1)
    for n, p in peft_model.named_parameters():
        if "lora_" in n:
            p.data.normal_(0, 0.1)  # B starts at zero; a zero delta would hide every layout mistake
    return peft_model


def _check_against_peft(peft_model, out, kind: str) -> int:
    reader = gguf.GGUFReader(str(out))
    fields = {k: reader.fields[k].contents() for k in ("general.architecture", "general.type", "adapter.type",
                                                        "adapter.lora.alpha")}
    assert fields == {"general.architecture": kind, "general.type": "adapter", "adapter.type": "lora",
                      "adapter.lora.alpha": 0.0}
    tensors = {t.name: torch.tensor(np.array(t.data), dtype=torch.float32) for t in reader.tensors}
    cfg = peft_model.config
    proc = TENSOR_PROCESSORS.get(kind, TensorProcessor)(config={"num_attention_heads": cfg.num_attention_heads,
                                                                 "num_key_value_heads": cfg.num_key_value_heads})
    names = gguf.get_tensor_name_map(ARCH[kind], cfg.num_hidden_layers)
    checked = 0
    for name, mod in peft_model.named_modules():
        if not (hasattr(mod, "lora_A") and "default" in mod.lora_A):
            continue
        target = names.get_name(name.removeprefix("base_model.model."))
        a, b = tensors[f"{target}.weight.lora_a"], tensors[f"{target}.weight.lora_b"]
        # llama.cpp with adapter.lora.alpha = 0 adds exactly lora_b @ lora_a (times the user scale, 1)
        delta = proc.process((b @ a).numpy(), f"{target}.weight").weights
        torch.testing.assert_close(torch.as_tensor(np.ascontiguousarray(delta)), mod.get_delta_weight("default"),
                                   rtol=1e-5, atol=1e-6)
        checked += 1
    assert len(tensors) == 2 * checked
    return checked


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma3"])
def test_gguf_lora_equals_peft_delta(tmp_path, kind):
    model = tiny_model(kind)
    _fake_base_gguf(tmp_path / "base.gguf", kind, model)
    # per-module ranks and alphas (what auto placement writes) and rsLoRA scaling
    peft_model = _random_lora(model, r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                       "gate_proj", "up_proj", "down_proj"],
                              rank_pattern={"k_proj": 2, "layers.1.mlp.down_proj": 6},
                              alpha_pattern={"v_proj": 3}, use_rslora=(kind == "qwen2"))
    peft_model.save_pretrained(tmp_path / "adapter")
    out = export_gguf_lora(tmp_path / "adapter", tmp_path / "base.gguf", tmp_path / "repair.gguf")
    assert _check_against_peft(peft_model, out, kind) == 2 * 7


def test_llama_q_k_rows_are_permuted(tmp_path):
    # The rotary row order is what the check above can catch: without it Q/K deltas must differ.
    model = tiny_model("llama")
    _fake_base_gguf(tmp_path / "base.gguf", "llama", model)
    peft_model = _random_lora(model, r=4, lora_alpha=4, target_modules=["q_proj"])
    peft_model.save_pretrained(tmp_path / "adapter")
    out = export_gguf_lora(tmp_path / "adapter", tmp_path / "base.gguf", tmp_path / "repair.gguf")
    t = {x.name: torch.tensor(np.array(x.data)) for x in gguf.GGUFReader(str(out)).tensors}
    raw = t["blk.0.attn_q.weight.lora_b"] @ t["blk.0.attn_q.weight.lora_a"]
    want = peft_model.base_model.model.model.layers[0].self_attn.q_proj.get_delta_weight("default")
    assert not torch.allclose(raw, want, atol=1e-3)
    assert _check_against_peft(peft_model, out, "llama") == 2


def test_gguf_lora_refuses_what_it_cannot_express(tmp_path):
    model = tiny_model("llama")
    _fake_base_gguf(tmp_path / "base.gguf", "llama", model)
    _random_lora(model, r=4, target_modules=["q_proj"], use_dora=True).save_pretrained(tmp_path / "dora")
    with pytest.raises(RecoverLoraError, match="use_dora"):
        export_gguf_lora(tmp_path / "dora", tmp_path / "base.gguf", tmp_path / "x.gguf")

    other = tiny_model("llama", seed=1, hidden_size=48, intermediate_size=64)  # same names, other shapes
    _random_lora(other, r=4, target_modules=["q_proj"]).save_pretrained(tmp_path / "wrong")
    with pytest.raises(RecoverLoraError, match=r"q_proj: adapter is 48 x 48, blk\.0\.attn_q\.weight"):
        export_gguf_lora(tmp_path / "wrong", tmp_path / "base.gguf", tmp_path / "x.gguf")

    with pytest.raises(RecoverLoraError, match="not a GGUF file"):
        export_gguf_lora(tmp_path / "wrong", tmp_path / "wrong" / "adapter_config.json", tmp_path / "x.gguf")


def test_export_cli_writes_gguf_lora(tmp_path, capsys):
    model = tiny_model("qwen2")
    _fake_base_gguf(tmp_path / "base.gguf", "qwen2", model)
    peft_model = _random_lora(model, r=2, lora_alpha=4, target_modules=["k_proj", "v_proj"])
    peft_model.save_pretrained(tmp_path / "adapter")
    assert main(["export", "--degraded", str(tmp_path / "base.gguf"), "--adapter", str(tmp_path / "adapter"),
                 "--gguf-lora", str(tmp_path / "r.gguf"), "--gguf-dtype", "f16"]) == 0
    reader = gguf.GGUFReader(str(tmp_path / "r.gguf"))
    assert {t.tensor_type for t in reader.tensors} == {gguf.GGMLQuantizationType.F16}
    assert len(reader.tensors) == 2 * 2 * 2
    assert main(["export", "--degraded", str(tmp_path / "base.gguf"), "--adapter", str(tmp_path / "adapter")]) == 2
    assert "needs --out" in capsys.readouterr().err


@pytest.mark.integration
def test_gguf_lora_for_the_real_smollm2_file(tmp_path):
    # The real GGUF's metadata (head counts 9/3, names) and tensors; a two-layer model of its shapes
    # stands in for the 30-layer one, which changes nothing for the layers it has.
    from recover_lora import zoo

    path = zoo.fetch("smollm2")
    model = tiny_model("llama", hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                       num_key_value_heads=3, num_hidden_layers=2)
    peft_model = _random_lora(model, r=8, lora_alpha=16, target_modules="all-linear")
    peft_model.save_pretrained(tmp_path / "adapter")
    out = export_gguf_lora(tmp_path / "adapter", path, tmp_path / "repair.gguf")
    assert _check_against_peft(peft_model, out, "llama") == 2 * 7


def test_recover_writes_the_gguf_lora_for_a_gguf_degraded_model(tmp_path, caplog):
    from recover_lora.recover import _gguf_lora

    model = tiny_model("llama")
    _fake_base_gguf(tmp_path / "base.gguf", "llama", model)
    peft_model = _random_lora(model, r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    peft_model.save_pretrained(tmp_path / "adapter")
    assert _gguf_lora(str(tmp_path / "base.gguf"), tmp_path / "adapter", tmp_path / "adapter.gguf") \
        == tmp_path / "adapter.gguf"
    assert _check_against_peft(peft_model, tmp_path / "adapter.gguf", "llama") == 4
    assert _gguf_lora(str(tmp_path / "folder"), tmp_path / "adapter", tmp_path / "no.gguf") is None  # not GGUF
    # a GGUF the adapter does not fit: the run keeps its PEFT adapter and says why there is no GGUF one
    _fake_base_gguf(tmp_path / "other.gguf", "llama", tiny_model("llama", hidden_size=48))
    assert _gguf_lora(str(tmp_path / "other.gguf"), tmp_path / "adapter", tmp_path / "no.gguf") is None
    assert "no GGUF LoRA written" in caplog.text and not (tmp_path / "no.gguf").exists()
