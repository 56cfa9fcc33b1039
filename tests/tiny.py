"""Tiny randomly initialised Llama-, Qwen2- and Gemma3-shaped models and a tiny tokenizer."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, PreTrainedTokenizerFast,
                          Qwen2Config)

WORDS = ("the a an of to and in is was on for with as by at it this that from be are or not cat dog "
         "sat mat ran red blue green big small yes no one two three four five six seven eight nine ten "
         "sun moon star tree rock water fire air earth light dark up down left right good bad").split()
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
VOCAB = 128


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS)}
    # Fill the vocabulary up to VOCAB with filler word pieces so it matches the model's embedding.
    i = len(vocab)
    while i < VOCAB:
        vocab[f"w{i}"] = i
        i += 1
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>",
                                  pad_token="<pad>", unk_token="<unk>")
    return tok


def tiny_config(kind: str = "llama", **overrides):
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=True)
    common.update(overrides)
    if kind == "llama":
        return LlamaConfig(**common)
    if kind == "qwen2":
        return Qwen2Config(**common)
    if kind == "gemma3":
        common.setdefault("head_dim", 8)
        common.update(num_key_value_heads=overrides.get("num_key_value_heads", 1), sliding_window=16,
                      query_pre_attn_scalar=8)
        return Gemma3TextConfig(**common)
    raise ValueError(kind)


def tiny_model(kind: str = "llama", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(kind, **overrides), dtype=torch.float32)
    model.eval()
    return model


def arc_records(n: int) -> list[dict]:
    """``n`` ARC-shaped records in the tiny vocabulary (question, four choices, answers A..D in turn)."""
    g = torch.Generator().manual_seed(0)
    words = WORDS[6:40]
    recs = []
    for i in range(n):
        p = torch.randperm(len(words), generator=g)[:7].tolist()
        recs.append({"id": f"q{i}", "question": " ".join(words[j] for j in p[:3]),
                     "choices": {"text": [words[p[3 + j]] for j in range(4)], "label": list("ABCD")},
                     "answerKey": "ABCD"[i % 4]})
    return recs
