import torch, pytest
from recover_lora.degrade import DegradeConfig, degrade, parse_op, GgufOp
from recover_lora.utils import RecoverLoraError
from tiny import tiny_model

def test_gguf_op_is_llama_cpp_q4_0_by_hand():
    """gguf:Q4_0 leaves each weight as llama.cpp's Q4_0 stores it: per block of 32 inputs, d = max/-8
    (the signed value of largest magnitude), q = clamp(round(x/d) + 8, 0, 15), x' = (q - 8) * d."""
    model = tiny_model("llama")
    w0 = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    assert parse_op("gguf:q4_0") == GgufOp(type="Q4_0") == parse_op("gguf:type=Q4_0")
    degrade(model, DegradeConfig(ops=[parse_op("gguf:Q4_0")]))
    w1 = model.model.layers[0].self_attn.q_proj.weight.detach()
    x = w0.reshape(-1, 32).double()
    mx = x.gather(1, x.abs().argmax(1, keepdim=True))
    d = (mx / -8).float().double()
    q = torch.clamp(torch.floor(x / d + 8.5), 0, 15)  # ggml: (int8)(x*id + 8.5), clamped to 15
    d16 = d.half().double()  # the scale is stored as fp16
    want = ((q - 8) * d16).reshape(w0.shape)
    assert torch.allclose(w1.double(), want, atol=1e-6)
    assert not torch.equal(w0, w1) and len(torch.unique(w1.reshape(-1, 32)[0])) <= 16

def test_gguf_op_refuses_unknown_types_and_odd_rows():
    with pytest.raises(RecoverLoraError, match="K-quants"):
        parse_op("gguf:Q2_K")
    model = tiny_model("llama", hidden_size=40, intermediate_size=48)
    with pytest.raises(RecoverLoraError, match="blocks of 32"):
        degrade(model, DegradeConfig(ops=[parse_op("gguf:Q4_0")]))
