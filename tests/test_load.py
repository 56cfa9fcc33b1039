import copy

import pytest
import torch
from safetensors.torch import save_file
from tiny import tiny_model, tiny_tokenizer

from recover_lora.load import (IncompatibleModelsError, LoadConfig, check_compatible, fingerprint, load_model,
                               load_pair, needs_bos, save_model_dir)
from recover_lora.utils import RecoverLoraError

CPU = LoadConfig(device="cpu")


@pytest.fixture
def ref_dir(tmp_path):
    model = tiny_model("llama")
    return save_model_dir(model, tmp_path / "ref", tiny_tokenizer()), model


def test_folder_round_trip(ref_dir):
    path, model = ref_dir
    loaded = load_model(str(path), CPU)
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), n
    assert fingerprint(loaded) == fingerprint(model)
    assert not any(p.requires_grad for p in loaded.parameters())


def test_safetensors_state_dict_over_reference_config(ref_dir, tmp_path):
    path, model = ref_dir
    ref = load_model(str(path), CPU)
    state = {k: v + 1.0 for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, tmp_path / "deg.safetensors")
    deg = load_model(str(tmp_path / "deg.safetensors"), CPU, reference=ref)
    assert torch.equal(deg.model.layers[0].self_attn.q_proj.weight, state["model.layers.0.self_attn.q_proj.weight"])
    # tied embeddings stay tied
    assert deg.lm_head.weight.data_ptr() == deg.model.embed_tokens.weight.data_ptr()


def test_state_dict_shape_mismatch_names_tensor(ref_dir, tmp_path):
    path, model = ref_dir
    ref = load_model(str(path), CPU)
    state = dict(model.state_dict())
    state["model.layers.1.mlp.up_proj.weight"] = torch.zeros(65, 32)
    save_file({k: v.contiguous() for k, v in state.items() if k != "lm_head.weight"}, tmp_path / "bad.safetensors")
    with pytest.raises(IncompatibleModelsError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*\(65, 32\).*\(64, 32\)"):
        load_model(str(tmp_path / "bad.safetensors"), CPU, reference=ref)


def test_pickle_refused_without_opt_in(ref_dir, tmp_path):
    path, model = ref_dir
    ref = load_model(str(path), CPU)
    torch.save(model.state_dict(), tmp_path / "deg.bin")
    with pytest.raises(RecoverLoraError, match="pickle"):
        load_model(str(tmp_path / "deg.bin"), CPU, reference=ref)
    ok = load_model(str(tmp_path / "deg.bin"), LoadConfig(device="cpu", allow_pickle=True), reference=ref)
    assert fingerprint(ok) == fingerprint(model)
    # a folder holding only pickle weights is refused too
    folder = tmp_path / "pickled"
    folder.mkdir()
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(RecoverLoraError, match="pickle"):
        load_model(str(folder), CPU)


def test_missing_path_is_clear(tmp_path):
    with pytest.raises(RecoverLoraError, match="does not exist"):
        load_model(str(tmp_path / "nope.gguf"), CPU)


@pytest.mark.parametrize("change,pattern", [
    (dict(kind="qwen2"), "architecture differs: reference is 'llama', degraded is 'qwen2'"),
    (dict(num_hidden_layers=3), "num_hidden_layers differs: reference 2, degraded 3"),
    (dict(hidden_size=48, intermediate_size=64), "hidden_size differs"),
    (dict(intermediate_size=96), "intermediate_size differs: reference 64, degraded 96"),
    (dict(vocab_size=130), "vocabulary size differs: reference 128, degraded 130"),
    (dict(num_key_value_heads=4), "num_key_value_heads differs: reference 2, degraded 4"),
])
def test_mismatches_are_named(change, pattern):
    ref = tiny_model("llama")
    kind = change.pop("kind", "llama")
    deg = tiny_model(kind, **change)
    with pytest.raises(IncompatibleModelsError, match=pattern):
        check_compatible(ref, deg)


def test_tensor_shape_mismatch_named():
    ref = tiny_model("llama")
    deg = copy.deepcopy(ref)
    deg.model.layers[1].self_attn.k_proj.weight = torch.nn.Parameter(torch.zeros(8, 32))
    with pytest.raises(IncompatibleModelsError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight shape differs"):
        check_compatible(ref, deg)


def test_tokenizer_mismatch_named():
    ref = tiny_model("llama")
    t1 = tiny_tokenizer()
    t2 = tiny_tokenizer()
    t2.add_tokens(["brandnew"])
    with pytest.raises(IncompatibleModelsError, match="tokenizer size differs: reference 128, degraded 129"):
        check_compatible(ref, copy.deepcopy(ref), t1, t2)
    check_compatible(ref, copy.deepcopy(ref), t1, tiny_tokenizer())  # identical: fine


def test_load_pair_checks(tmp_path):
    ref = tiny_model("llama")
    save_model_dir(ref, tmp_path / "ref", tiny_tokenizer())
    save_model_dir(tiny_model("llama", num_hidden_layers=3), tmp_path / "deg")
    with pytest.raises(IncompatibleModelsError, match="num_hidden_layers"):
        load_pair(str(tmp_path / "ref"), str(tmp_path / "deg"), CPU)


def test_needs_bos():
    tok = tiny_tokenizer()
    assert needs_bos(tok, tiny_model("gemma3").config)  # Gemma: always
    assert not needs_bos(tok, tiny_model("llama").config)  # follows the tokenizer, which adds none


def test_converted_gguf_loads_the_same_model_and_tokenizer(tmp_path, monkeypatch):
    """The dense form kept after the first load of a GGUF file gives the same weights, bit for bit,
    and the same tokenizer (ids, special tokens, BOS rule) as transformers' GGUF reader."""
    from pathlib import Path

    from recover_lora import load, zoo

    gguf = Path(zoo.fetch("smollm2"))
    monkeypatch.setenv("RECOVER_LORA_GGUF_CACHE", "0")
    direct, tok0 = load_model(str(gguf), CPU), load.load_tokenizer(str(gguf), CPU)
    monkeypatch.setenv("RECOVER_LORA_GGUF_CACHE", "1")
    conv = tmp_path / "conv"
    monkeypatch.setattr(load, "gguf_converted_dir", lambda p: conv)
    first = load_model(str(gguf), CPU)  # converts and keeps it
    assert (conv / "DONE").exists() and (conv / "model.safetensors").exists()
    again, tok1 = load_model(str(gguf), CPU), load.load_tokenizer(str(gguf), CPU)
    sd0 = direct.state_dict()
    for m in (first, again):
        sd = m.state_dict()
        assert sd.keys() == sd0.keys() and all(torch.equal(sd[k], sd0[k]) for k in sd0)
    assert again.config.to_dict() == direct.config.to_dict()
    text = ["Hello world", " The quick brown fox", "Question: 2+2?\nAnswer: 4<|endoftext|>"]
    assert tok1(text)["input_ids"] == tok0(text)["input_ids"]
    assert (tok1.bos_token_id, tok1.eos_token_id, tok1.pad_token_id) == (tok0.bos_token_id, tok0.eos_token_id,
                                                                         tok0.pad_token_id)
    assert load.needs_bos(tok1, again.config) == load.needs_bos(tok0, direct.config)
    bf16 = load_model(str(gguf), LoadConfig(device="cpu", dtype="bfloat16"))
    assert bf16.dtype == torch.bfloat16
