import copy
import json

import pytest
import torch
from tiny import WORDS, tiny_model, tiny_tokenizer

from recover_lora.config import FullKDConfig, SFTConfig

from recover_lora.methods.sft_lora import build_sft_examples, gold_nll, run_sft_lora

from recover_lora.methods.full_kd import degraded_view, prepare_full_kd, run_full_kd, snapshot_state
from recover_lora.degrade import DegradeConfig, NoiseOp, degrade
from recover_lora.config import AdapterConfig, DistillConfig
from recover_lora.distill import attach_adapters
from recover_lora.kl import measure
from recover_lora.synth import SynthConfig, generate_shard
from recover_lora.utils import RecoverLoraError


def _pair(rel=0.3, seed=0):
    ref = tiny_model("llama", seed=seed, initializer_range=0.2)
    deg = copy.deepcopy(ref)
    degrade(deg, DegradeConfig(ops=[NoiseOp(rel=rel)], seed=seed))
    return ref, deg


def _data(ref, n, seq_len=24, seed=0):
    return generate_shard(ref, tiny_tokenizer(), SynthConfig(seq_len=seq_len, batch_size=64, seed=seed), 0, n,
                          bos=False).long()


# ---------------------------------------------------------------- full-KD

def test_full_kd_trains_every_parameter_and_lowers_heldout_kl(tmp_path):
    ref, deg = _pair()
    ref_before = snapshot_state(ref)
    deg_before = snapshot_state(deg)
    train_ids, held = _data(ref, 64), _data(ref, 16, seed=1)
    dcfg = DistillConfig(steps=25, batch_size=16, warmup_steps=2, eval_every=0, checkpoint_every=0)
    kl0 = measure(deg, ref, held)["kl"]
    state = run_full_kd(ref, deg, train_ids, dcfg, held, tmp_path / "ck.pt", FullKDConfig(lr=3e-3), progress=False)
    assert state.step == 25
    kl1 = measure(deg, ref, held)["kl"]
    assert kl1 < 0.7 * kl0, (kl0, kl1)
    after = deg.state_dict()
    changed = [k for k in deg_before if not torch.equal(deg_before[k], after[k])]
    # every parameter moved: embeddings (tied with lm_head), norms, all linears
    assert set(changed) >= {n for n, _ in deg.named_parameters()}
    assert deg.lm_head.weight is deg.model.embed_tokens.weight  # still tied
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in ref_before.items())  # teacher untouched
    ck = torch.load(tmp_path / "ck.pt", weights_only=False)
    assert ck["config"]["lr"] == 3e-3 and len(ck["trainable"]) == len(list(deg.parameters()))
    # the degraded weights can be viewed again for evaluation
    with degraded_view(deg, deg_before):
        assert measure(deg, ref, held)["kl"] == pytest.approx(kl0, rel=1e-5)
    assert measure(deg, ref, held)["kl"] == pytest.approx(kl1, rel=1e-5)


def test_full_kd_prepare_upcasts_and_refuses_shared_teacher():
    ref, deg = _pair()
    deg = deg.to(torch.bfloat16)
    n = prepare_full_kd(deg, ref)
    assert n == sum(p.numel() for p in deg.parameters())
    assert all(p.dtype == torch.float32 and p.requires_grad for p in deg.parameters())
    shallow = copy.copy(ref)  # shares every tensor with ref
    with pytest.raises(RecoverLoraError, match="shares tensors"):
        prepare_full_kd(shallow, ref)
    frozen = copy.deepcopy(ref)
    prepare_full_kd(frozen, None, FullKDConfig(train_embeddings=False))
    assert not frozen.model.embed_tokens.weight.requires_grad


# ---------------------------------------------------------------- SFT-LoRA

def _arc_records(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    words = WORDS[6:40]
    recs = []
    for i in range(n):
        pick = torch.randperm(len(words), generator=g)[:7].tolist()
        gold = int(torch.randint(0, 4, (1,), generator=g))
        recs.append({"id": f"q{i}", "question": f"{words[pick[0]]} {words[pick[1]]} {words[pick[2]]}",
                     "choices": {"text": [f"{words[pick[3 + j]]} {words[(pick[0] + j) % len(words)]}" for j in range(4)],
                                 "label": ["A", "B", "C", "D"]},
                     "answerKey": "ABCD"[gold]})
    return recs


def _write(tmp_path, task, split, recs):
    d = tmp_path / task
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))


def test_sft_examples_use_eval_formatting(tmp_path):
    tok = tiny_tokenizer()
    recs = _arc_records(3)
    _write(tmp_path, "arc_easy", "train", recs)
    ex, skipped = build_sft_examples(tok, ["arc_easy"], tmp_path)
    assert len(ex) == 3 and not skipped
    r = recs[0]
    gold = r["choices"]["text"]["ABCD".index(r["answerKey"])]
    assert tok.decode(ex[0].ids[ex[0].n_context:]) == gold
    assert tok.decode(ex[0].ids[:ex[0].n_context]) == tok.decode(tok(f"Question: {r['question']}\nAnswer:")["input_ids"])


def test_sft_lora_lowers_gold_nll_and_only_lora_changes(tmp_path):
    tok = tiny_tokenizer()
    _write(tmp_path, "arc_easy", "train", _arc_records(32))
    ref, deg = _pair()
    student = attach_adapters(deg, AdapterConfig(modules="attn-mlp", rank=4))
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    cfg = SFTConfig(steps=30, batch_size=8, lr=1e-2, warmup_steps=2, checkpoint_every=0)
    res = run_sft_lora(student, tok, ["arc_easy"], tmp_path, cfg, progress=False)
    assert res["tasks"] == {"arc_easy": 32} and res["steps"] == 30 and res["loss_tokens"] > 0
    assert res["nll_after"] < 0.7 * res["nll_before"], res
    for n, p in student.named_parameters():
        if "lora_" in n:
            if "lora_B" in n:
                assert not torch.equal(p, before[n]), n
        else:
            assert torch.equal(p, before[n]), n


def test_sft_lora_resume_is_exact(tmp_path):
    tok = tiny_tokenizer()
    _write(tmp_path, "arc_easy", "train", _arc_records(16))
    cfg = SFTConfig(steps=6, batch_size=4, lr=1e-2, warmup_steps=1, checkpoint_every=0)
    outs = []
    for interrupted in (False, True):
        _, deg = _pair()
        student = attach_adapters(deg, AdapterConfig(modules="kv", rank=2))
        ck = tmp_path / f"ck{interrupted}.pt"
        if interrupted:
            run_sft_lora(student, tok, ["arc_easy"], tmp_path, cfg, checkpoint=ck, progress=False, stop_after=3)
            _, deg = _pair()
            student = attach_adapters(deg, AdapterConfig(modules="kv", rank=2))
        run_sft_lora(student, tok, ["arc_easy"], tmp_path, cfg, checkpoint=ck, progress=False)
        outs.append({n: p.detach().clone() for n, p in student.named_parameters() if p.requires_grad})
    for n in outs[0]:
        torch.testing.assert_close(outs[0][n], outs[1][n], rtol=0, atol=0)


def test_sft_lora_missing_train_split_names_the_task(tmp_path):
    tok = tiny_tokenizer()
    _write(tmp_path, "arc_easy", "train", _arc_records(4))
    _write(tmp_path, "hellaswag", "validation", [])
    _, deg = _pair()
    student = attach_adapters(deg, AdapterConfig(modules="kv", rank=2))
    for task in ("piqa", "hellaswag", "mmlu_philosophy"):
        with pytest.raises(RecoverLoraError, match=f"task {task} has no train split"):
            run_sft_lora(student, tok, ["arc_easy", task], tmp_path, SFTConfig(steps=1), progress=False)
    ex, skipped = build_sft_examples(tok, "arc_easy,piqa", tmp_path, SFTConfig(skip_missing=True))
    assert skipped == ["piqa"] and len(ex) == 4
    with pytest.raises(RecoverLoraError, match="no trainable parameters"):
        run_sft_lora(tiny_model().requires_grad_(False), tok, ["arc_easy"], tmp_path, SFTConfig(steps=1),
                     progress=False)

def test_gold_nll_matches_naive(tmp_path):
    tok = tiny_tokenizer()
    _write(tmp_path, "arc_easy", "train", _arc_records(5))
    model = tiny_model(initializer_range=0.2)
    ex, _ = build_sft_examples(tok, ["arc_easy"], tmp_path)
    total, n = 0.0, 0
    with torch.no_grad():
        for e in ex:
            logp = torch.log_softmax(model(torch.tensor([e.ids])).logits[0].float(), -1)
            for p in range(e.n_context, len(e.ids)):
                total -= logp[p - 1, e.ids[p]].item()
                n += 1
    assert gold_nll(model, ex, batch_size=2) == pytest.approx(total / n, rel=1e-5)
