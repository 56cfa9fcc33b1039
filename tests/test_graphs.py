"""The CUDA-graph training step's bookkeeping (warm-up, restore, self-check, fallback) and
activation checkpointing, checked on the CPU.

A real capture needs a GPU; here ``graphs.capture_impl`` is swapped for an eager stand-in whose
"replay" reruns the step into the same output tensors. Everything around the capture (static
buffers, the warm-up that must leave no trace, the check that rejects a wrong graph, the tensor
learning rate the scheduler must keep updating, checkpoints that any mode can resume) runs as
it does on the GPU.
"""

from __future__ import annotations

import pytest
import torch

from recover_lora.training import graphs
from recover_lora.config import AdapterConfig, DistillConfig
from recover_lora.forward import activation_checkpointing, hidden_states
from recover_lora.distill import attach_adapters, train
from recover_lora.utils import RecoverLoraError
from tiny import tiny_model


def _setup(layers: int = 2):
    teacher = tiny_model("llama", num_hidden_layers=layers).requires_grad_(False)
    student = attach_adapters(tiny_model("llama", seed=1, num_hidden_layers=layers), AdapterConfig(rank=4), seed=0)
    ids = torch.randint(4, 128, (24, 12), generator=torch.Generator().manual_seed(0))
    return teacher, student, ids


def _cfg(**kw) -> DistillConfig:
    base = dict(steps=6, batch_size=4, lr=5e-3, warmup_steps=2, eval_every=0, checkpoint_every=0)
    base.update(kw)
    return DistillConfig(**base)


def _adapter(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture
def emulated(monkeypatch):
    monkeypatch.setattr(graphs, "capture_impl", graphs._eager_capture)


def test_graph_mode_is_off_on_cpu_and_on_refuses():
    teacher, student, ids = _setup()
    st = train(student, teacher, ids, _cfg(steps=2), progress=False)
    assert st.step_mode.startswith("eager (not on a CUDA device")
    with pytest.raises(RecoverLoraError, match="cuda_graph='on'"):
        train(student, teacher, ids, _cfg(steps=2, cuda_graph="on"), progress=False)


@pytest.mark.parametrize("hidden_weight", [0.0, 2.0])  # 2.0: the layer loss is a third graph output
def test_graphed_run_equals_eager_run(emulated, hidden_weight):
    teacher, student, ids = _setup()
    eager = train(student, teacher, ids, _cfg(cuda_graph="off", hidden_weight=hidden_weight), progress=False)
    want = _adapter(student)
    teacher, student, ids = _setup()
    graphed = train(student, teacher, ids, _cfg(cuda_graph="on", hidden_weight=hidden_weight), progress=False)
    assert graphed.step_mode == "cuda_graph"
    # The three warm-up steps and the check replay left no trace: same losses, same adapter.
    assert [h["loss"] for h in graphed.history] == pytest.approx([h["loss"] for h in eager.history], rel=1e-5)
    assert [h["lr"] for h in graphed.history] == pytest.approx([h["lr"] for h in eager.history])
    assert [h.get("hidden_loss") for h in graphed.history] == pytest.approx([h.get("hidden_loss") for h in eager.history])
    got = _adapter(student)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-6)
    assert eager.history[-1]["loss"] < eager.history[0]["loss"]  # and the run learns


def test_a_graph_that_disagrees_is_rejected_and_leaves_no_trace(monkeypatch):
    def bad_capture(fn, static, opt):
        out = fn(static)

        def replay():  # a "graph" that forgot the new batch: reruns on shuffled tokens
            for o, n in zip(out, fn([s.flip(0).roll(3, dims=1) for s in static])):
                o.copy_(n)
        return replay, out, None

    monkeypatch.setattr(graphs, "capture_impl", bad_capture)
    teacher, student, ids = _setup()
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=torch.tensor(1e-2))
    before = [p.detach().clone() for p in params]

    def step(xs):
        opt.zero_grad(set_to_none=True)
        loss = (hidden_states(student, xs[0]) ** 2).mean()
        loss.backward()
        opt.step()
        return (loss.detach(),)

    g, why = graphs.capture_step(step, [ids[:4]], params, opt)
    assert g is None and "disagrees" in why
    for p, b in zip(params, before):
        assert torch.equal(p, b)
    assert all(float(s["step"]) == 0 and not s["exp_avg"].any() for s in opt.state.values())

    # train(): "auto" falls back to eager steps and gets the eager result; "on" refuses.
    teacher, student, ids = _setup()
    st = train(student, teacher, ids, _cfg(cuda_graph="auto"), progress=False)
    assert st.step_mode.startswith("eager (graph capture failed: graph replay disagrees")
    fallback = _adapter(student)
    teacher, student, ids = _setup()
    train(student, teacher, ids, _cfg(cuda_graph="off"), progress=False)
    for n, t in _adapter(student).items():
        torch.testing.assert_close(fallback[n], t, rtol=1e-5, atol=1e-6)
    teacher, student, ids = _setup()
    with pytest.raises(RecoverLoraError, match="capture failed"):
        train(student, teacher, ids, _cfg(cuda_graph="on"), progress=False)


def test_a_capture_that_raises_falls_back(monkeypatch):
    def broken(fn, static, opt):
        fn(static)  # gets half-way (grads, optimizer state touched) then fails
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(graphs, "capture_impl", broken)
    teacher, student, ids = _setup()
    st = train(student, teacher, ids, _cfg(), progress=False)
    assert "operation not permitted" in st.step_mode
    got = _adapter(student)
    teacher, student, ids = _setup()
    train(student, teacher, ids, _cfg(cuda_graph="off"), progress=False)
    for n, t in _adapter(student).items():
        torch.testing.assert_close(got[n], t, rtol=1e-5, atol=1e-6)


def test_graph_checkpoint_resumes_eagerly(emulated, tmp_path):
    """A checkpoint written in graph mode (tensor learning rate) resumes in eager mode and gives
    the uninterrupted run's adapter."""
    teacher, student, ids = _setup()
    train(student, teacher, ids, _cfg(cuda_graph="off"), progress=False)
    want = _adapter(student)
    teacher, student, ids = _setup()
    ck = tmp_path / "ck.pt"
    train(student, teacher, ids, _cfg(cuda_graph="on"), checkpoint=ck, progress=False, stop_after=3)
    saved = torch.load(ck, weights_only=False)
    assert all(isinstance(g["lr"], float) for g in saved["optimizer"]["param_groups"])
    teacher, student2, ids = _setup()
    st = train(student2, teacher, ids, _cfg(cuda_graph="off"), checkpoint=ck, progress=False)
    assert st.step == 6
    for n, t in _adapter(student2).items():
        torch.testing.assert_close(t, want[n], rtol=1e-5, atol=1e-6)


def _saved_bytes(model, ids) -> int:
    """Bytes autograd keeps for the backward of one student forward (outside checkpointed layers)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        hidden_states(model, ids).sum().backward()
    return total


def testactivation_checkpointing_same_math_less_memory():
    teacher, student, ids = _setup(layers=4)
    plain = _saved_bytes(student, ids[:8])
    activation_checkpointing(student, True)
    ckpt = _saved_bytes(student, ids[:8])
    activation_checkpointing(student, False)
    assert ckpt < 0.35 * plain, (ckpt, plain)
    assert _saved_bytes(student, ids[:8]) == plain  # off again

    train(student, teacher, ids, _cfg(), progress=False)
    want = _adapter(student)
    teacher, student, ids = _setup(layers=4)
    st = train(student, teacher, ids, _cfg(activation_checkpointing=True), progress=False)
    for n, t in _adapter(student).items():
        torch.testing.assert_close(t, want[n], rtol=1e-4, atol=1e-6)
    assert st.history[-1]["loss"] < st.history[0]["loss"]


def test_a_scheduler_that_replaces_the_lr_tensor_cannot_freeze_it(emulated, monkeypatch):
    """Older torch schedulers write a float into the param group instead of filling the tensor: the
    captured step must still see each new lr (else it would train at the first warm-up lr forever)."""
    import torch.optim.lr_scheduler as lrs

    def assign_float(param_group, key, val):
        param_group[key] = float(val)

    monkeypatch.setattr(lrs, "_update_param_group_val", assign_float)
    teacher, student, ids = _setup()
    train(student, teacher, ids, _cfg(cuda_graph="off"), progress=False)
    want = _adapter(student)

    teacher, student, ids = _setup()
    train(student, teacher, ids, _cfg(cuda_graph="on"), progress=False)
    for n, t in _adapter(student).items():
        torch.testing.assert_close(t, want[n], rtol=1e-5, atol=1e-6)
