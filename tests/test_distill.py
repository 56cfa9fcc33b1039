import copy

import pytest
import torch
from peft import PeftModel
from tiny import tiny_model, tiny_tokenizer

from recover_lora.degrade import DegradeConfig, NoiseOp, degrade
from recover_lora.config import AdapterConfig, DistillConfig
from recover_lora.adapters import adapter_targets
from recover_lora.distill import attach_adapters, train
from recover_lora.training.state import batch_indices, loss_rise
from recover_lora.kl import measure
from recover_lora.forward import trainable_parameters
from recover_lora.training.losses import chunked_loss_backward, divergence, hidden_match_loss, naive_loss
from recover_lora.synth import SynthConfig, generate_shard
from recover_lora.utils import RecoverLoraError


def _pair(kind="llama", rel=0.3, seed=0):
    ref = tiny_model(kind, seed=seed, initializer_range=0.2)
    deg = copy.deepcopy(ref)
    degrade(deg, DegradeConfig(ops=[NoiseOp(rel=rel)], seed=seed))
    return ref, deg


def _data(ref, n=64, seq_len=24, seed=0):
    return generate_shard(ref, tiny_tokenizer(), SynthConfig(seq_len=seq_len, batch_size=64, seed=seed), 0, n,
                          bos=False).long()


@pytest.mark.parametrize("preset,expected", [
    ("kv", {"k_proj", "v_proj"}),
    ("attn", {"q_proj", "k_proj", "v_proj", "o_proj"}),
    ("attn-mlp", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
    ("all-linear", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
    ("q_proj,down_proj", {"q_proj", "down_proj"}),
])
@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma3"])
def test_adapter_placement(kind, preset, expected):
    model = tiny_model(kind)
    names = adapter_targets(AdapterConfig(modules=preset), model)
    assert {n.rsplit(".", 1)[-1] for n in names} == expected
    assert len(names) == 2 * len(expected)  # two layers
    assert not any("lm_head" in n or "embed" in n for n in names)


def test_layer_subset_and_errors():
    model = tiny_model("llama")
    names = adapter_targets(AdapterConfig(modules="kv", layers="1"), model)
    assert names == ["model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.v_proj"]
    with pytest.raises(RecoverLoraError, match="out of range"):
        adapter_targets(AdapterConfig(layers="5"), model)
    with pytest.raises(RecoverLoraError, match="match no linear module"):
        adapter_targets(AdapterConfig(modules="w_nonexistent"), model)


def test_only_adapters_train_and_start_as_degraded():
    ref, deg = _pair()
    x = _data(ref, 4)
    with torch.no_grad():
        before = deg(x).logits
    student = attach_adapters(deg, AdapterConfig(modules="kv", rank=4))
    assert trainable_parameters(student) == 2 * 2 * 4 * (32 + 16)  # 2 layers x {k,v} x r*(in+out)
    with torch.no_grad():
        assert torch.allclose(student(x).logits, before)  # B = 0 at init


@pytest.mark.parametrize("kind", ["kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_chunked_loss_equals_naive(kind, temperature):
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hs = torch.randn(3, 7, 16, requires_grad=True)
    ht = torch.randn(3, 7, 16)
    naive = naive_loss(head(hs), head(ht).detach(), kind, temperature)
    naive.backward()
    g_naive = hs.grad.clone()
    hs.grad = None
    loss, top1 = chunked_loss_backward(hs, ht, head, head, kind, temperature, chunk_tokens=5)
    assert loss == pytest.approx(naive.item(), rel=1e-5)
    assert torch.allclose(hs.grad, g_naive, atol=1e-6)
    assert top1 == pytest.approx((head(hs).argmax(-1) == head(ht).argmax(-1)).float().mean().item())


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_teacher_topk_loss_equals_autograd_reference(temperature):
    """Top-k teacher: KL over the teacher's top-k tokens plus one "any other token" outcome."""
    torch.manual_seed(0)
    k, T, V = 4, temperature, 50
    head = torch.nn.Linear(16, V, bias=False)
    hs = torch.randn(3, 7, 16, requires_grad=True)
    ht = torch.randn(3, 7, 16)
    s_logits, t_logits = head(hs).reshape(-1, V), head(ht).detach().reshape(-1, V)
    idx = t_logits.topk(k, dim=-1).indices
    lp, lq = torch.log_softmax(t_logits / T, -1), torch.log_softmax(s_logits / T, -1)
    p, q = lp.gather(-1, idx).exp(), lq.gather(-1, idx).exp()
    p_rest, q_rest = 1 - p.sum(-1), 1 - q.sum(-1)
    ref = ((p * (p.log() - q.log())).sum(-1) + p_rest * (p_rest.log() - q_rest.log())).mean() * T ** 2
    ref.backward()
    g_ref = hs.grad.clone()
    hs.grad = None
    loss, _ = chunked_loss_backward(hs, ht, head, head, "kl", T, chunk_tokens=5, teacher_topk=k)
    assert loss == pytest.approx(ref.item(), rel=1e-5)
    assert torch.allclose(hs.grad, g_ref, atol=1e-6)
    # k = V - 1 leaves one token in the "rest" outcome: exactly the full KL
    full, _ = chunked_loss_backward(hs, ht, head, head, "kl", T, chunk_tokens=5, backward=False)
    assert chunked_loss_backward(hs, ht, head, head, "kl", T, chunk_tokens=5, backward=False,
                                 teacher_topk=V - 1)[0] == pytest.approx(full, rel=1e-5)
    with pytest.raises(ValueError, match="forward KL"):
        chunked_loss_backward(hs, ht, head, head, "jsd", T, teacher_topk=k)
    with pytest.raises(RecoverLoraError, match="teacher_topk"):
        DistillConfig(loss="reverse_kl", teacher_topk=8).validate()


def test_hidden_match_loss_by_hand_and_extra_loss_backward():
    s = [torch.tensor([[[1.0, 0.0], [0.0, 3.0]]]), torch.tensor([[[2.0, 2.0], [0.0, 0.0]]])]
    t = [torch.tensor([[[2.0, 0.0], [0.0, 1.0]]]), torch.tensor([[[2.0, 0.0], [0.0, 4.0]]])]
    # layer 0: tokens 1/4 and 4/1; layer 1: tokens 4/4 and 16/16
    assert hidden_match_loss(s, t).item() == pytest.approx(((0.25 + 4) / 2 + (1 + 1) / 2) / 2)
    assert hidden_match_loss(t, t).item() == 0.0
    # an extra loss rides the same backward pass as the chunked KL
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hs = torch.randn(3, 7, 16, requires_grad=True)
    ht = torch.randn(3, 7, 16)
    (naive_loss(head(hs), head(ht).detach()) + 0.3 * hidden_match_loss([hs * 2], [ht])).backward()
    g_ref = hs.grad.clone()
    hs.grad = None
    loss, _ = chunked_loss_backward(hs, ht, head, head, chunk_tokens=5,
                                    extra_loss=0.3 * hidden_match_loss([hs * 2], [ht]))
    assert loss == pytest.approx(naive_loss(head(hs), head(ht)).item(), rel=1e-5)  # the KL alone
    assert torch.allclose(hs.grad, g_ref, atol=1e-6)
    with pytest.raises(RecoverLoraError, match="hidden_weight"):
        DistillConfig(hidden_weight=-1).validate()


def test_distillation_with_layer_loss_lowers_both():
    ref, deg = _pair()
    train_ids, held = _data(ref, 64), _data(ref, 16, seed=1)
    student = attach_adapters(deg, AdapterConfig(rank=8))
    before = measure(student, ref, held)
    state = train(student, ref, train_ids, DistillConfig(steps=40, batch_size=16, lr=1e-2, warmup_steps=3,
                                                         eval_every=0, hidden_weight=1.0), progress=False)
    after = measure(student, ref, held)
    assert after["kl"] < 0.7 * before["kl"], (before, after)
    hid = [h["hidden_loss"] for h in state.history]
    assert sum(hid[-5:]) < 0.7 * sum(hid[:5]), hid
    one = tiny_model("llama", seed=0, num_hidden_layers=1)  # no intermediate layer: named, not an IndexError
    with pytest.raises(RecoverLoraError, match="hidden_weight needs intermediate layers"):
        train(attach_adapters(copy.deepcopy(one), AdapterConfig(rank=4)), one, train_ids,
              DistillConfig(steps=1, batch_size=8, eval_every=0, hidden_weight=1.0), progress=False)


def test_divergences_by_hand():
    p = torch.tensor([[0.5, 0.5]]).log()
    q = torch.tensor([[0.9, 0.1]]).log()
    kl_pq = 0.5 * torch.log(torch.tensor(0.5 / 0.9)) + 0.5 * torch.log(torch.tensor(0.5 / 0.1))
    assert divergence(q, p, "kl").item() == pytest.approx(kl_pq.item(), rel=1e-5)  # KL(teacher p || student q)
    kl_qp = 0.9 * torch.log(torch.tensor(0.9 / 0.5)) + 0.1 * torch.log(torch.tensor(0.1 / 0.5))
    assert divergence(q, p, "reverse_kl").item() == pytest.approx(kl_qp.item(), rel=1e-5)
    m = torch.tensor([0.7, 0.3])
    js = 0.5 * (0.5 * torch.log(0.5 / m)).sum() + 0.5 * (torch.tensor([0.9, 0.1]) * torch.log(torch.tensor([0.9, 0.1]) / m)).sum()
    assert divergence(q, p, "jsd").item() == pytest.approx(js.item(), rel=1e-5)
    assert divergence(p, p, "kl").item() == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma3"])
def test_distillation_lowers_heldout_kl(kind):
    ref, deg = _pair(kind)
    train_ids, held = _data(ref, 64), _data(ref, 16, seed=1)
    student = attach_adapters(deg, AdapterConfig(rank=8))
    before = measure(student, ref, held)
    state = train(student, ref, train_ids, DistillConfig(steps=50, batch_size=16, lr=1e-2, warmup_steps=3,
                                                         eval_every=0), progress=False)
    after = measure(student, ref, held)
    assert after["kl"] < 0.7 * before["kl"], (before, after)
    assert state.history[-1]["loss"] < state.history[0]["loss"]


def test_resumed_run_equals_uninterrupted(tmp_path):
    ref, deg = _pair()
    ids = _data(ref, 48)
    cfg = DistillConfig(steps=8, batch_size=8, lr=5e-3, warmup_steps=2, checkpoint_every=3, eval_every=0)
    a = attach_adapters(copy.deepcopy(deg), AdapterConfig(rank=4, dropout=0.1))
    sa = train(a, ref, ids, cfg, progress=False)

    b = attach_adapters(copy.deepcopy(deg), AdapterConfig(rank=4, dropout=0.1))
    ck = tmp_path / "ck.pt"
    train(b, ref, ids, cfg, checkpoint=ck, progress=False, stop_after=5)
    # a fresh process: new model object, same adapter init, state from the checkpoint
    torch.manual_seed(1234)  # whatever the RNG was doing meanwhile must not matter
    c = attach_adapters(copy.deepcopy(deg), AdapterConfig(rank=4, dropout=0.1))
    sc = train(c, ref, ids, cfg, checkpoint=ck, progress=False)
    assert sc.step == 8
    assert [h["loss"] for h in sc.history] == [h["loss"] for h in sa.history]
    for (n, p), (_, q) in zip(a.named_parameters(), c.named_parameters()):
        if p.requires_grad:
            assert torch.equal(p, q), n


def test_resume_with_other_settings_refused(tmp_path):
    ref, deg = _pair()
    ids = _data(ref, 16)
    ck = tmp_path / "ck.pt"
    train(attach_adapters(copy.deepcopy(deg), AdapterConfig(rank=4)), ref, ids,
          DistillConfig(steps=2, batch_size=8, eval_every=0), checkpoint=ck, progress=False)
    with pytest.raises(RecoverLoraError, match="other training settings.*lr"):
        train(attach_adapters(copy.deepcopy(deg), AdapterConfig(rank=4)), ref, ids,
              DistillConfig(steps=2, batch_size=8, lr=3e-3, eval_every=0), checkpoint=ck, progress=False)


def test_checkpoint_from_before_a_new_setting_resumes_under_its_default(tmp_path):
    # A checkpoint written before a setting existed (here: hidden_weight) resumes when the setting
    # is left at its default, and is refused under any other value.
    ref, deg = _pair()
    ids = _data(ref, 16)
    ck = tmp_path / "ck.pt"
    cfg = DistillConfig(steps=4, batch_size=8, eval_every=0, checkpoint_every=2)
    train(attach_adapters(copy.deepcopy(deg), AdapterConfig(rank=4)), ref, ids, cfg, checkpoint=ck,
          progress=False, stop_after=2)
    payload = torch.load(ck, weights_only=False)
    del payload["config"]["hidden_weight"]
    torch.save(payload, ck)
    with pytest.raises(RecoverLoraError, match="other training settings.*hidden_weight"):
        train(attach_adapters(copy.deepcopy(deg), AdapterConfig(rank=4)), ref, ids,
              DistillConfig(steps=4, batch_size=8, eval_every=0, hidden_weight=1.0), checkpoint=ck,
              progress=False)
    state = train(attach_adapters(copy.deepcopy(deg), AdapterConfig(rank=4)), ref, ids, cfg, checkpoint=ck,
                  progress=False)
    assert state.step == 4 and len(state.history) == 4


def _rising(**kw):
    """Settings under which training undoes a good start on the tiny pair: a lightly damaged model
    (its loss starts low) and a step far too large once the 20-step warm-up ends."""
    return DistillConfig(**{"steps": 40, "batch_size": 8, "lr": 0.1, "warmup_steps": 20, "eval_every": 0, **kw})


def test_rewind_goes_back_to_the_start_when_the_loss_rises():
    ref, deg = _pair(rel=0.05)
    ids = _data(ref, 64)
    start = attach_adapters(copy.deepcopy(deg), AdapterConfig(rank=4))
    plain = train(copy.deepcopy(start), ref, ids, _rising(), progress=False)
    # where the unguarded run's 10-step mean first passes 1.5x the first 10 steps' (from step 20, to half-way)
    expected = min(s for s in range(20, 40 // 2 + 1) if loss_rise(plain.history[:s]) > 1.5)
    guarded_model = copy.deepcopy(start)
    guarded = train(guarded_model, ref, ids, _rising(rewind_rise=1.5, rewind_lr_scale=0.1), progress=False)
    b = guarded.rewound_at
    assert b == expected
    assert [h["loss"] for h in guarded.history[:b]] == [h["loss"] for h in plain.history[:b]]
    # the rest is a fresh schedule at a tenth of the step: warm-up from its first step
    assert guarded.history[b]["lr"] == pytest.approx(0.1 * 0.1 / 20)
    assert guarded.history[b]["loss"] < 0.5 * plain.history[b]["loss"]  # the first step after: at the start again
    last = lambda st: sum(h["loss"] for h in st.history[-10:]) / 10  # noqa: E731
    assert last(guarded) < 0.2 * last(plain), (last(guarded), last(plain))
    # with an lr scale near zero the run ends where it started: the rewind put the start back
    still = copy.deepcopy(start)
    train(still, ref, ids, _rising(rewind_rise=1.5, rewind_lr_scale=1e-6), progress=False)
    for (n, p), (_, q) in zip(still.named_parameters(), start.named_parameters()):
        if p.requires_grad:
            assert torch.allclose(p, q, atol=1e-5), n


def test_rewind_that_never_triggers_changes_nothing():
    ref, deg = _pair()
    ids = _data(ref, 64)
    cfg = dict(steps=50, batch_size=8, lr=1e-2, warmup_steps=3, eval_every=0)
    a = attach_adapters(copy.deepcopy(deg), AdapterConfig(rank=4))
    b = copy.deepcopy(a)
    sa = train(a, ref, ids, DistillConfig(**cfg), progress=False)
    sb = train(b, ref, ids, DistillConfig(**cfg, rewind_rise=1.2), progress=False)
    assert all(loss_rise(sa.history[:s]) <= 1.2 for s in range(20, 50 // 2 + 1))  # the window it watches
    assert sb.rewound_at == 0
    assert [h["loss"] for h in sb.history] == [h["loss"] for h in sa.history]
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n


def test_resume_across_a_rewind_equals_uninterrupted(tmp_path):
    ref, deg = _pair(rel=0.05)
    ids = _data(ref, 64)
    cfg = _rising(rewind_rise=1.5, checkpoint_every=3)
    start = attach_adapters(copy.deepcopy(deg), AdapterConfig(rank=4))
    whole = copy.deepcopy(start)
    sw = train(whole, ref, ids, cfg, progress=False)
    assert sw.rewound_at == 20
    ck = tmp_path / "ck.pt"
    for stop in (18, 6, None):  # before the rewind (its start made again by the caller), across it, to the end
        model = copy.deepcopy(start)
        torch.manual_seed(99)
        st = train(model, ref, ids, cfg, checkpoint=ck, progress=False, stop_after=stop)
    assert st.step == 40 and st.rewound_at == 20
    assert [h["loss"] for h in st.history] == [h["loss"] for h in sw.history]
    assert [h["lr"] for h in st.history] == [h["lr"] for h in sw.history]
    for (n, p), (_, q) in zip(whole.named_parameters(), model.named_parameters()):
        if p.requires_grad:
            assert torch.equal(p, q), n


@pytest.mark.parametrize("kw", [{"rewind_rise": 1.0}, {"rewind_rise": -2.0}, {"rewind_lr_scale": 0.0},
                                {"rewind_lr_scale": 1.5}])
def test_rewind_settings_are_checked(kw):
    with pytest.raises(RecoverLoraError, match="rewind"):
        DistillConfig(**kw).validate()


def test_saved_adapter_loads_with_peft(tmp_path):
    ref, deg = _pair()
    ids = _data(ref, 16)
    student = attach_adapters(copy.deepcopy(deg), AdapterConfig(modules="attn-mlp", rank=4))
    train(student, ref, ids, DistillConfig(steps=3, batch_size=8, lr=1e-2, eval_every=0), progress=False)
    student.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(copy.deepcopy(deg), tmp_path / "adapter")
    student.eval()
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, student(ids).logits, atol=1e-5)
        assert not torch.allclose(deg(ids).logits, student(ids).logits, atol=1e-4)


def test_batch_order_is_a_function_of_step():
    a = [batch_indices(20, 6, s, seed=0).tolist() for s in range(7)]
    b = [batch_indices(20, 6, s, seed=0).tolist() for s in range(7)]
    assert a == b
    assert sorted(sum(a[:3], [])) == sorted(set(sum(a[:3], [])))  # no repeats inside an epoch
    with pytest.raises(RecoverLoraError, match="only 3 training sequences"):
        batch_indices(3, 4, 0, 0)


def test_metrics_stream_as_they_come_and_a_resume_reads_as_one_run(tmp_path):
    """train(metrics=...) appends a JSON line a step (and one per held-out measurement), to
    TensorBoard too; a run interrupted after its checkpoint and resumed leaves the same lines as an
    uninterrupted run (what was logged past the checkpoint is dropped on resume)."""
    import json

    from recover_lora.metrics import MetricsLog, read_metrics

    ref, deg = _pair()
    ids = _data(ref, 48)
    held = _data(ref, 8, seed=1)
    cfg = DistillConfig(steps=6, batch_size=8, lr=5e-3, warmup_steps=2, checkpoint_every=2, eval_every=3)
    one = MetricsLog(tmp_path / "one.jsonl", tmp_path / "tb")
    train(attach_adapters(copy.deepcopy(deg), AdapterConfig(rank=4)), ref, ids, cfg, held, progress=False,
          metrics=one)
    one.close()
    recs = read_metrics(tmp_path / "one.jsonl")
    assert [r["step"] for r in recs if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in recs if r["kind"] == "heldout"] == [3] and recs[3]["kind"] == "heldout"
    assert all(r["loss"] > 0 and "lr" in r and "tokens" in r for r in recs if r["kind"] == "train")

    ck, path = tmp_path / "ck.pt", tmp_path / "two.jsonl"
    train(attach_adapters(copy.deepcopy(deg), AdapterConfig(rank=4)), ref, ids, cfg, held, ck, progress=False,
          stop_after=3, metrics=MetricsLog(path))
    ck_step = 3  # stop_after=3 leaves its checkpoint at step 3
    with open(path, "a") as f:  # a step logged after the checkpoint, then the process died
        f.write(json.dumps({"kind": "train", "step": ck_step + 1, "loss": 9.9}) + "\n")
    train(attach_adapters(copy.deepcopy(deg), AdapterConfig(rank=4)), ref, ids, cfg, held, ck, progress=False,
          metrics=MetricsLog(path))
    two = read_metrics(path)
    key = [(r["kind"], r["step"]) for r in recs]
    assert [(r["kind"], r["step"]) for r in two] == key
    assert [r["loss"] for r in two if r["kind"] == "train"] == [r["loss"] for r in recs if r["kind"] == "train"]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(tmp_path / "tb"))
    ea.Reload()
    assert [e.step for e in ea.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]
    assert ea.Scalars("train/loss")[0].value == pytest.approx(recs[0]["loss"])


def test_bf16_on_a_cpu_without_bf16_matmuls_is_named(monkeypatch, caplog):
    """bf16 autocast on a CPU that emulates bf16 matmuls (~50x slower than fp32) says so, once."""
    import recover_lora.forward as fwd

    cfg = DistillConfig(autocast="bf16")
    for fast, expect in ((True, 0), (False, 1)):
        monkeypatch.setattr(fwd, "cpu_has_bf16", lambda fast=fast: fast)
        fwd.warn_slow_cpu_bf16.cache_clear()
        caplog.clear()
        assert fwd.autocast_on(cfg, torch.device("cpu")) and fwd.autocast_on(cfg, torch.device("cpu"))
        assert sum("without bf16 matmul" in r.message for r in caplog.records) == expect
    assert not fwd.autocast_on(DistillConfig(autocast="auto"), torch.device("cpu"))
    fwd.warn_slow_cpu_bf16.cache_clear()
