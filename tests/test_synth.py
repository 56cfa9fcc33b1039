import os

import pytest
import torch
from tiny import tiny_model, tiny_tokenizer

from recover_lora.synth import (SynthConfig, generate_shard, load_synthetic, manifest, sample_next,
                                start_token_pool, synthesize)
from recover_lora.utils import RecoverLoraError


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma3"])
def test_first_tokens_greedy_then_sampled(kind):
    model = tiny_model(kind, initializer_range=0.2)
    tok = tiny_tokenizer()
    cfg = SynthConfig(seq_len=12, batch_size=5, greedy_min=3, greedy_max=5, seed=3)
    ids = generate_shard(model, tok, cfg, 0, 10, bos=(kind == "gemma3")).long()
    p = 2 if kind == "gemma3" else 1
    if kind == "gemma3":
        assert (ids[:, 0] == tok.bos_token_id).all()
    assert not torch.isin(ids[:, p - 1 if kind != "gemma3" else 1], torch.tensor(tok.all_special_ids)).any()
    with torch.no_grad():
        logits = model(ids).logits
    argmax = logits.argmax(-1)  # argmax[:, t] predicts ids[:, t + 1]
    greedy_hits = (argmax[:, p - 1:-1] == ids[:, p:])
    # the first 3 generated tokens are always greedy
    assert greedy_hits[:, :3].all()
    # later tokens are sampled: across 10 sequences some differ from the argmax
    assert not greedy_hits[:, 5:].all()
    # every sampled token is inside the top-k of its position
    topk = logits.topk(cfg.top_k, -1).indices[:, p - 1:-1]
    assert (topk == ids[:, p:, None]).any(-1).all()


def test_greedy_count_per_sequence_is_respected():
    logits = torch.tensor([[0.0, 5.0, 4.9], [0.0, 5.0, 4.9]])
    noise = torch.tensor([[0.5, 0.999999], [0.5, 0.999999]])  # strongly favours the 2nd of top-2
    out = sample_next(logits, torch.tensor([True, False]), noise, top_k=2, temperature=1.0)
    assert out.tolist() == [1, 2]


def test_sampling_distribution_matches_softmax_topk():
    torch.manual_seed(0)
    logits = torch.tensor([[2.0, 1.0, 0.0, -5.0]]).repeat(20000, 1)
    out = sample_next(logits, torch.zeros(20000, dtype=torch.bool), torch.rand(20000, 3), top_k=3, temperature=1.0)
    freq = torch.bincount(out, minlength=4).float() / 20000
    want = torch.softmax(torch.tensor([2.0, 1.0, 0.0]), 0)
    assert freq[3] == 0
    assert torch.allclose(freq[:3], want, atol=0.015)


def test_start_pool_excludes_special_tokens():
    tok = tiny_tokenizer()
    pool = start_token_pool(tok, 128)
    assert not set(pool.tolist()) & set(tok.all_special_ids)
    assert len(pool) == 128 - len(tok.all_special_ids)


def test_static_and_dynamic_cache_agree():
    model = tiny_model("gemma3", initializer_range=0.2)  # sliding-window layers too
    tok = tiny_tokenizer()
    a = generate_shard(model, tok, SynthConfig(seq_len=24, batch_size=4, cache="dynamic"), 0, 6, bos=True)
    b = generate_shard(model, tok, SynthConfig(seq_len=24, batch_size=3, cache="static"), 0, 6, bos=True)
    assert torch.equal(a, b)  # also: batch size does not change the data


def test_resume_after_interruption_equals_one_run(tmp_path):
    model = tiny_model("llama", initializer_range=0.2)
    tok = tiny_tokenizer()
    cfg = SynthConfig(num_sequences=10, seq_len=10, shard_size=4, batch_size=4)
    full = load_synthetic(synthesize(model, tok, cfg, tmp_path / "a", progress=False))
    assert full.shape == (10, 10)
    # simulate a crash: a shard missing and the manifest not marked complete
    synthesize(model, tok, cfg, tmp_path / "b", progress=False)
    os.remove(tmp_path / "b" / "shard-00001.safetensors")
    m = manifest(tmp_path / "b")
    assert m["complete"]
    (tmp_path / "b" / "manifest.json").write_text((tmp_path / "b" / "manifest.json").read_text()
                                                  .replace('"complete": true', '"complete": false'))
    with pytest.raises(RecoverLoraError, match="incomplete"):
        load_synthetic(tmp_path / "b")
    resumed = load_synthetic(synthesize(model, tok, cfg, tmp_path / "b", progress=False))
    assert torch.equal(full, resumed)


def test_other_settings_refused(tmp_path):
    model = tiny_model("llama")
    tok = tiny_tokenizer()
    synthesize(model, tok, SynthConfig(num_sequences=4, seq_len=8), tmp_path, progress=False)
    with pytest.raises(RecoverLoraError, match="other settings"):
        synthesize(model, tok, SynthConfig(num_sequences=4, seq_len=8, top_k=10), tmp_path, progress=False)


def test_bad_settings():
    with pytest.raises(RecoverLoraError, match="greedy_min"):
        SynthConfig(num_sequences=4, greedy_min=5, greedy_max=3).validate()
    with pytest.raises(RecoverLoraError, match="not a synthetic data folder"):
        load_synthetic("/nonexistent-folder")


def test_shared_decoders_and_short_batches_give_the_same_data():
    model = tiny_model("llama", initializer_range=0.2)
    tok = tiny_tokenizer()
    cfg = SynthConfig(seq_len=10, batch_size=4, cache="static")
    decoders = {}
    a = generate_shard(model, tok, cfg, 0, 7, bos=False, decoders=decoders)  # batches of 4 and 3
    b = generate_shard(model, tok, cfg, 0, 7, bos=False, decoders=decoders)  # decoders reused
    c = generate_shard(model, tok, SynthConfig(seq_len=10, batch_size=7, cache="dynamic"), 0, 7, bos=False)
    assert torch.equal(a, b) and torch.equal(a, c)
    assert set(decoders) == {4, 3}


def test_cpu_decodes_with_a_bf16_copy_where_the_cpu_multiplies_bf16(tmp_path, monkeypatch):
    """auto dtype: bf16 decode copy on a bf16-capable CPU (recorded in the manifest), the model
    itself untouched; data made that way are not mixed with fp32-decoded shards."""
    from recover_lora import synth

    model, tok = tiny_model("llama", initializer_range=0.2), tiny_tokenizer()
    cfg = SynthConfig(num_sequences=8, seq_len=10, shard_size=4)
    monkeypatch.setattr(synth, "cpu_has_bf16", lambda: True)
    assert synth.decode_dtype(model, cfg) == torch.bfloat16
    assert synth.decode_dtype(model, SynthConfig(dtype="model")) == torch.float32
    synthesize(model, tok, cfg, tmp_path / "bf16", progress=False)
    assert manifest(tmp_path / "bf16")["settings"]["decode_dtype"] == "bfloat16"
    assert next(model.parameters()).dtype == torch.float32
    monkeypatch.setattr(synth, "cpu_has_bf16", lambda: False)
    assert synth.decode_dtype(model, cfg) == torch.float32
    with pytest.raises(RecoverLoraError, match="other settings"):
        synthesize(model, tok, cfg, tmp_path / "bf16", progress=False)
    synthesize(model, tok, cfg, tmp_path / "fp32", progress=False)
    assert "decode_dtype" not in manifest(tmp_path / "fp32")["settings"]  # fp32 keys as before


def test_one_default_for_how_much_data_python_api_and_cli_alike(tmp_path):
    """SynthConfig's default count is 'one fresh pass of the training steps' wherever a config is
    made (the README's Python example once trained on 1024 sequences repeated); synthesizing alone
    without a count is refused by name."""
    from recover_lora.config import DistillConfig
    from recover_lora.recover import RecoverConfig, train_synth_config
    from recover_lora.synth import synthesize
    from recover_lora.utils import RecoverLoraError

    api = RecoverConfig(synth=SynthConfig(seq_len=16), distill=DistillConfig(steps=7, batch_size=3))
    yml = RecoverConfig.from_dict({"synth": {"seq_len": 16}, "distill": {"steps": 7, "batch_size": 3}})
    assert train_synth_config(api).num_sequences == train_synth_config(yml).num_sequences == 21
    with pytest.raises(RecoverLoraError, match="num_sequences >= 1"):
        synthesize(tiny_model("llama"), tiny_tokenizer(), SynthConfig(seq_len=8), tmp_path / "s", progress=False)
