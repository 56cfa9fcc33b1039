"""Batched log-likelihood scoring of (context, continuation) pairs, as lm-eval's HFLM does it.

Tokenization (``encode_pairs``) follows lm-eval 0.4 ``LM._encode_pair`` / ``LM.loglikelihood``:
trailing whitespace of the context moves onto the continuation; the continuation's tokens are
``enc(context + continuation)[len(enc(context)):]``; an empty context is replaced by the prefix
token (BOS, else EOS). ``enc`` prepends BOS when ``add_bos`` (see ``load.needs_bos``: the
tokenizer's own setting, always for Gemma), unless the text already starts with the BOS string.

Scoring (``score``) matches lm-eval's ``_loglikelihood_tokens``: the model sees
``(ctx + cont)[-(max_length + 1):][:-1]`` and the log-softmax at the continuation positions gives
the log-likelihood and whether greedy decoding reproduces the continuation. For speed:

- identical model inputs are computed once: choices sharing a context and differing only in
  a one-token continuation (MMLU's " A".." D", BoolQ's " no"/" yes") or duplicate requests share a row
  (lm-eval's "one-token continuation cache", generalised);
- rows are sorted by length (longest first) and packed into batches under a padded-token
  budget, right-padded (causal attention makes padding invisible to real tokens);
- only the continuation positions go through the LM head (``logits_to_keep`` boolean mask),
  and the log-softmax, gather and per-request sums are vectorised on the device.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..utils import log


def tokenizer_prefix_id(tokenizer) -> int:
    """lm-eval's ``prefix_token_id``: BOS if the tokenizer has one, else EOS."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def encode_pairs(tokenizer, pairs: Sequence[tuple[str, str]], add_bos: bool) -> list[tuple[list[int], list[int]]]:
    """Token ids (context, continuation) for each pair, as lm-eval builds them."""
    bos_id, bos_str = tokenizer.bos_token_id, tokenizer.bos_token

    def head(s: str) -> list[int]:
        return [bos_id] if add_bos and bos_id is not None and not (bos_str and s.startswith(bos_str)) else []

    strings: dict[str, None] = {}
    norm: list[tuple[str, str]] = []
    for ctx, cont in pairs:
        if ctx == "":
            strings.setdefault(cont)
            norm.append(("", cont))
            continue
        n = len(ctx) - len(ctx.rstrip())
        if n:
            ctx, cont = ctx[:-n], ctx[-n:] + cont
        strings.setdefault(ctx)
        strings.setdefault(ctx + cont)
        norm.append((ctx, cont))
    keys = list(strings)
    ids = tokenizer(keys, add_special_tokens=False)["input_ids"] if keys else []
    enc = dict(zip(keys, ids))
    out = []
    prefix = tokenizer_prefix_id(tokenizer)
    for ctx, cont in norm:
        if ctx == "":
            c = list(enc[cont])
            out.append(([prefix], c) if c and c[0] != prefix else (c[:1], c[1:]))
            continue
        whole = head(ctx + cont) + list(enc[ctx + cont])
        c = head(ctx) + list(enc[ctx])
        out.append((c, whole[len(c):]))
    return out


def model_max_length(model, default: int = 2048) -> int:
    """lm-eval's max_length resolution (model config first), used for left truncation."""
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "text_config", None) or cfg
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        v = getattr(cfg, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return default


def default_batch_tokens(device: torch.device, vocab_size: int) -> int:
    """Padded tokens per forward when none is given: 4096 on a CPU; on a GPU 32768, or fewer where the
    logits ([tokens, vocab] in fp32, about three copies) would take over a quarter of this process's
    memory: what is free now, and its share of the GPU when ``study --jobs N`` runs N processes on one
    (RECOVER_LORA_GPU_SHARE, 1/N; nine processes at 32768 tokens ran out of an H200's memory)."""
    if device.type != "cuda":
        return 4096
    free, total = torch.cuda.mem_get_info(device)
    share = float(os.environ.get("RECOVER_LORA_GPU_SHARE") or 1.0)
    budget = min(free, share * total) / 4
    return int(max(1024, min(32768, budget // (3 * 4 * max(1, vocab_size)))))


def _device_of(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _window(model) -> int | None:
    """Sliding-window length of the model's local attention layers (Gemma), if any."""
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "text_config", None) or cfg
    w = getattr(cfg, "sliding_window", None)
    return w if isinstance(w, int) and w > 0 else None


def _common_prefix(seqs: list[tuple[int, ...]]) -> int:
    n = min(len(x) for x in seqs)
    first = seqs[0]
    for i in range(n):
        if any(x[i] != first[i] for x in seqs[1:]):
            return i
    return n


def _rows(requests, max_length: int, share: bool, window: int | None, groups: Sequence | None = None):
    """Requests -> model input rows. A row is a prefix and zero or more tails packed behind it: the
    requests of one group (the choices of one question; by default those with the same context)
    share one pass over their longest common token prefix, and each request's remaining tokens form
    its own tail (own positions, attending to the prefix and itself). Model inputs are lm-eval's,
    ``(ctx + cont)[-(max_length + 1):][:-1]``. Returns ``rows`` [(prefix, [tails], packable)] and,
    per request, (row, tail index or -1, first needed position, its target ids). Rows that are not
    packable (no sharing asked for, or longer than a sliding window) run alone, as lm-eval runs them."""
    inps = []
    for ctx, cont in requests:
        if len(ctx) == 0 or len(cont) == 0:
            raise ValueError("context and continuation must both be non-empty token lists")
        if len(cont) > max_length:
            raise ValueError(f"continuation of {len(cont)} tokens exceeds the model's {max_length}")
        inps.append(tuple((list(ctx) + list(cont))[-(max_length + 1):][:-1]))
    members: dict = {}
    for i, (ctx, _) in enumerate(requests):
        # Packing changes nothing a causal model computes, unless a sliding window would cut a
        # long input differently from lm-eval's single row: such requests keep their own row.
        packed = share and (window is None or len(inps[i]) <= window)
        key = ("g", groups[i] if groups is not None else tuple(ctx)) if packed else ("own", inps[i])
        members.setdefault(key, []).append(i)
    rows: list[tuple[tuple[int, ...], list[tuple[int, ...]], bool]] = []
    where: list = [None] * len(requests)
    for key, idx in members.items():
        if key[0] == "own":
            rows.append((key[1], [], False))
            for i in idx:
                where[i] = (len(rows) - 1, -1, len(inps[i]) - len(requests[i][1]), list(requests[i][1]))
            continue
        L = _common_prefix([inps[i] for i in idx])
        # a needed position inside the prefix is shared; keep at least the context's last token there
        L = min(L, min(len(inps[i]) - len(requests[i][1]) + 1 for i in idx))
        prefix, tails, index = inps[idx[0]][:L], [], {}
        rows.append((prefix, tails, True))
        for i in idx:
            tail = inps[i][L:]
            t = -1
            if tail:
                t = index.get(tail)
                if t is None:
                    t = index[tail] = len(tails)
                    tails.append(tail)
            where[i] = (len(rows) - 1, t, len(inps[i]) - len(requests[i][1]), list(requests[i][1]))
    return rows, where


def _bins(rows, packable: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: packable rows into bins of at most ``capacity`` tokens (a bin is one
    model input row holding several questions, each attending only to itself), so that padding,
    not the model, stops being most of the work on short items."""
    width = {r: len(rows[r][0]) + sum(len(t) for t in rows[r][1]) for r in packable}
    bins: list[list[int]] = []
    free: list[int] = []
    for r in sorted(packable, key=lambda r: (-width[r], rows[r][0])):
        for k, f in enumerate(free):
            if width[r] <= f:
                bins[k].append(r)
                free[k] -= width[r]
                break
        else:
            bins.append([r])
            free.append(capacity - width[r])
    return bins


def _lines(requests, max_length: int, share_context: bool, window, groups):
    """The requests as rows (a shared prefix and its tails) packed into input lines: ("packed", [rows])
    under a block mask, or ("own", [row]) under the plain causal mask. Returns (rows, where, by_row,
    lines, line widths)."""
    rows, where = _rows(requests, max_length, share_context, window, groups)
    width = [len(p) + sum(len(t) for t in tails) for p, tails, _ in rows]
    by_row: list[list[int]] = [[] for _ in rows]
    for i, w in enumerate(where):
        by_row[w[0]].append(i)
    packable = [r for r in range(len(rows)) if rows[r][2]]
    capacity = max([256] + [width[r] for r in packable])
    lines = [("packed", b) for b in _bins(rows, packable, capacity)]
    lines += [("own", [r]) for r in range(len(rows)) if not rows[r][2]]
    return rows, where, by_row, lines, [sum(width[r] for r in rs) for _, rs in lines]


def _batches(lines: list, lw: list[int], batch_size: int | None, max_batch_tokens: int) -> list[list[int]]:
    """Input lines grouped into forwards: one kind a forward, longest first (an overrun shows at once),
    at most ``batch_size`` lines and ``max_batch_tokens`` padded tokens."""
    order = sorted(range(len(lines)), key=lambda k: (lines[k][0], -lw[k]))
    batches: list[list[int]] = []
    cur: list[int] = []
    for k in order:
        w = lw[cur[0]] if cur else lw[k]
        if cur and ((batch_size and len(cur) >= batch_size) or (len(cur) + 1) * w > max_batch_tokens
                    or lines[cur[0]][0] != lines[k][0]):
            batches.append(cur)
            cur = []
        cur.append(k)
    if cur:
        batches.append(cur)
    return batches


def _layout(line_rows: list[list[int]], T: int, rows, by_row, where, pad_id: int):
    """One forward's inputs: each line's rows (a shared prefix, then its tails) laid side by side, and
    the positions whose logits score each request. Returns (ids, keep, unit, sub, pos, need, req_ids)."""
    B = len(line_rows)
    ids = np.full((B, T), pad_id, dtype=np.int64)
    keep = np.zeros((B, T), dtype=bool)
    unit = np.full((B, T), -1, dtype=np.int64)  # which row (question) a position belongs to; -1 padding
    sub = np.zeros((B, T), dtype=np.int64)  # 0 its prefix, t+1 its tail t
    pos = np.zeros((B, T), dtype=np.int64)
    need: list[np.ndarray] = []
    req_ids: list[int] = []
    for b, line in enumerate(line_rows):
        o = 0
        for r in line:
            prefix, tails, _ = rows[r]
            P = len(prefix)
            ids[b, o:o + P], unit[b, o:o + P], pos[b, o:o + P] = prefix, r, np.arange(P)
            s, starts = o + P, []
            for t, tail in enumerate(tails):
                e = s + len(tail)
                ids[b, s:e], unit[b, s:e], sub[b, s:e] = tail, r, t + 1
                pos[b, s:e] = np.arange(P, P + len(tail))
                starts.append(s)
                s = e
            for i in by_row[r]:
                _, t, first, cont = where[i]
                # input positions first .. first+k-1 predict the continuation; those past the
                # prefix live in the request's tail
                q = first + np.arange(len(cont))
                p = np.where(q < P, o + q, (starts[t] if t >= 0 else 0) + q - P)
                keep[b, p] = True
                need.append(b * T + p)
                req_ids.append(i)
            o = s
    return ids, keep, unit, sub, pos, need, req_ids


def _inputs(kind: str, layout, where, model, device: torch.device):
    """A forward's model inputs (position ids and block mask for packed lines), the kept positions,
    and per request its positions among the kept ones, its target ids and its index in the batch."""
    ids, keep, unit, sub, pos, need, req_ids = layout
    flat = np.cumsum(keep.reshape(-1)) - 1  # index of a kept position among the kept ones
    sel_pos = [flat[x] for x in need]
    tgt = torch.from_numpy(np.concatenate([np.asarray(where[i][3], dtype=np.int64) for i in req_ids])).to(device)
    segr = torch.from_numpy(np.concatenate([np.full(len(x), j, dtype=np.int64) for j, x in enumerate(need)])).to(device)
    inputs = {"input_ids": torch.from_numpy(ids).to(device)}
    if kind == "packed":
        inputs["position_ids"] = torch.from_numpy(pos).to(device)
        inputs["attention_mask"] = _block_mask(unit, sub, model, device)
    return inputs, torch.from_numpy(keep).to(device), sel_pos, tgt, segr, req_ids


def _head_inputs(model, h: torch.Tensor, keep_t: torch.Tensor, logits: torch.Tensor, check: bool) -> torch.Tensor:
    """The LM head's input at the kept positions (``check``: it gives back these very logits)."""
    from .refcache import head_logits  # noqa: PLC0415

    h = h[keep_t] if h.dim() == 3 and h.shape[:2] == keep_t.shape else h.reshape(-1, h.shape[-1])
    if h.shape[0] != logits.shape[0]:
        raise RuntimeError(f"LM head saw {h.shape[0]} positions, the logits have {logits.shape[0]}")
    if check:
        diff = (head_logits(model, h[:64]).float() - logits[:64]).abs().max().item()
        if diff > head_check_tolerance(model, h.device.type) * max(1.0, logits[:64].abs().max().item()):
            raise RuntimeError(f"this model's logits are not its LM head of the kept states (max diff {diff:.2g})")
    return h


def head_check_tolerance(model, device_type: str) -> float:
    """How far (relative to the logits' size) the LM head of 64 kept states may be from the forward's
    own logits. In bf16/fp16 the two products may take different kernels (oneDNN/AMX picks its blocking
    by shape) and round apart by an ulp or two; what the check is for (a missing final norm or
    soft-capping, another model's head) is off by the logits' own size."""
    dt = (torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type)
          else model.get_output_embeddings().weight.dtype)
    return max(1e-3, 4 * torch.finfo(dt).eps)


def _kept_answer_kl(reference, hid: torch.Tensor, logits: torch.Tensor, lse: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """KL(reference || model) at each answer position, the reference's side from its kept answers."""
    pos_kl = torch.empty(len(p), dtype=torch.float32, device=logits.device)
    for a in range(0, len(p), 512):  # [tokens x vocabulary] at a time: bounded memory
        z = min(a + 512, len(p))
        lq = logits[p[a:z]] - lse[p[a:z], None]
        lr = reference.log_probs(hid[a:z]).to(logits.device)
        pos_kl[a:z] = (lr.exp() * (lr - lq)).sum(-1)
    return pos_kl


def _request_stats(logits: torch.Tensor, p: torch.Tensor, tgt: torch.Tensor, segr: torch.Tensor, n_req: int,
                   reference, hid: torch.Tensor | None, reference_logits) -> tuple:
    """Per request of a forward: summed log p of its targets, whether each was the argmax, and the
    summed KL(reference || model) over them (None without a reference; ``hid``: the reference's kept
    head inputs, else ``reference_logits()`` runs it on the same rows)."""
    # log p(target) = logit - logsumexp: no [positions x vocabulary] log-softmax is written
    lse = torch.logsumexp(logits, dim=-1)
    lp = logits[p, tgt] - lse[p]
    miss = (logits.argmax(dim=-1)[p] != tgt).to(torch.int64)
    kl = None
    if hid is not None:
        kl = _sum_by(segr, n_req, _kept_answer_kl(reference, hid, logits, lse, p))
    elif reference is not None:
        lq = logits.sub_(lse[:, None])
        lr = torch.log_softmax(reference_logits().float(), dim=-1)
        pos_kl = (lr.exp() * (lr - lq)).sum(-1)  # KL(reference || model) per kept position
        del lr, lq
        kl = _sum_by(segr, n_req, pos_kl[p])
    misses = torch.zeros(n_req, dtype=torch.int64, device=logits.device).index_add_(0, segr, miss)
    return _sum_by(segr, n_req, lp), (misses == 0).cpu(), kl


def _sum_by(segr: torch.Tensor, n: int, values: torch.Tensor) -> torch.Tensor:
    """Per-request sums (fp64, on the CPU) of per-position values."""
    return torch.zeros(n, dtype=torch.float64, device=values.device).index_add_(0, segr, values.double()).cpu()


@torch.inference_mode()
def score(model, requests: Sequence[tuple[Sequence[int], Sequence[int]]], batch_size: int | None = None,
          max_batch_tokens: int | None = None, max_length: int | None = None, progress: bool = False,
          pad_id: int = 0, desc: str = "scoring", share_context: bool = True,
          reference=None, groups: Sequence | None = None, keep_hidden: dict | None = None,
          resume: str | Path | None = None,
          resume_every: float = 60.0) -> list[tuple[float, bool]] | list[tuple[float, bool, float, int]]:
    """(log-likelihood, is_greedy) of each (context ids, continuation ids) request.

    ``batch_size``: at most this many input rows per forward (None: no cap besides the token budget).
    ``max_batch_tokens``: cap on padded tokens per forward (default: :func:`default_batch_tokens`).
    ``share_context``: the choices of a question share one pass over their common prefix, their
    remaining tokens packed behind it (own positions, a block attention mask), and several
    questions share an input row; False: one row per request, as lm-eval's ``hf`` backend.
    ``groups``: a key per request (its question); the requests of a group share their longest
    common token prefix (default: requests with the same context).
    ``reference``: also run this model on the same rows and return, per request, the summed
    KL(reference || model) over its continuation tokens and their count (the answer-token KL).
    The reference is a model (run beside, on the same rows) or a
    :class:`~recover_lora.evaluate.refcache.ReferenceAnswers` kept from one earlier pass (the same
    KL at the cost of one LM-head product at the answer positions).
    ``keep_hidden``: a dict filled with, per request index, the LM head's input at its continuation
    tokens ([tokens, hidden], float32, CPU): what ReferenceAnswers keeps.
    Results do not depend on the request order or on the batching.
    """
    from .refcache import ReferenceAnswers  # noqa: PLC0415

    kept_refs = isinstance(reference, ReferenceAnswers)
    if kept_refs and (missing := reference.has(requests)):
        raise ValueError(f"{len(missing)} of {len(requests)} requests are not among the reference's kept answers "
                         "(another task set, limit or tokenizer): build them again for these requests")
    if not requests:
        return []
    device = _device_of(model)
    max_length = max_length or model_max_length(model)
    if max_batch_tokens is None:
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        vocab = head.weight.shape[0] if head is not None else getattr(getattr(model, "config", None), "vocab_size", 0)
        max_batch_tokens = default_batch_tokens(device, vocab or 0)
    rows, where, by_row, lines, lw = _lines(requests, max_length, share_context, _window(model), groups)
    batches = _batches(lines, lw, batch_size, max_batch_tokens)

    n = len(requests)
    ll = torch.zeros(n, dtype=torch.float64)
    greedy = torch.zeros(n, dtype=torch.bool)
    kl = torch.zeros(n, dtype=torch.float64)
    ntok = torch.tensor([len(c) for _, _, _, c in where], dtype=torch.int64)
    state = {"use_mask": True}
    captured: list[torch.Tensor] = []
    hook = None
    if keep_hidden is not None:  # the LM head's input, whatever positions the model kept
        hook = model.get_output_embeddings().register_forward_hook(lambda m, a, o: captured.append(a[0]))
    checked = False
    from tqdm.auto import tqdm  # noqa: PLC0415

    done = torch.zeros(n, dtype=torch.bool)
    kept = None
    if resume is not None:
        from .partial import Partial, partial_key  # noqa: PLC0415

        settings = {"batch_size": batch_size, "max_batch_tokens": max_batch_tokens, "max_length": max_length,
                    "pad_id": pad_id, "share_context": share_context, "groups": None if groups is None else
                    [list(g) if isinstance(g, (tuple, list)) else g for g in groups],
                    "keep_hidden": keep_hidden is not None, "device": device.type,
                    "autocast": str(torch.get_autocast_dtype(device.type))
                    if torch.is_autocast_enabled(device.type) else None}
        kept = Partial(resume, partial_key(model, requests, settings, reference), every=resume_every)
        for shard in kept.load():
            ids = shard["ids"]
            ll[ids], greedy[ids], kl[ids], done[ids] = shard["ll"], shard["greedy"], shard["kl"], True
            if keep_hidden is not None:
                keep_hidden.update(zip(ids.tolist(), shard["hidden"]))
    bar = tqdm(total=n, desc=desc, unit="req", dynamic_ncols=True, disable=not progress,
               initial=int(done.sum()))
    try:
        for batch in batches:
            if done.any():
                ids_b = [i for k in batch for r in lines[k][1] for i in by_row[r]]
                if bool(done[ids_b].all()):  # scored before an interruption
                    continue
            inputs, keep_t, sel_pos, tgt, segr, req_ids = _inputs(
                lines[batch[0]][0], _layout([lines[k][1] for k in batch], lw[batch[0]], rows, by_row, where, pad_id),
                where, model, device)
            captured.clear()
            logits = _kept_logits(model, inputs, keep_t, state).float()
            p = torch.from_numpy(np.concatenate(sel_pos)).to(device)
            if keep_hidden is not None:
                h = _head_inputs(model, captured[-1], keep_t, logits, check=not checked)
                checked = True
                for j, x in enumerate(sel_pos):
                    keep_hidden[req_ids[j]] = h[torch.from_numpy(x).to(device)].float().cpu().clone()
            idx = torch.as_tensor(req_ids, dtype=torch.long)
            hid = torch.cat([reference.hidden_for(*requests[i]) for i in req_ids]) if kept_refs else None
            ll[idx], greedy[idx], k = _request_stats(logits, p, tgt, segr, len(req_ids), reference, hid,
                                                     lambda: _kept_logits(reference, inputs, keep_t, state))
            if k is not None:
                kl[idx] = k
            if kept is not None:
                kept.add(idx, ll[idx], greedy[idx], kl[idx],
                         [keep_hidden[i] for i in req_ids] if keep_hidden is not None else None)
            del logits
            bar.update(len(req_ids))
    finally:
        if hook is not None:
            hook.remove()
        if kept is not None:  # also when interrupted: what finished is kept
            kept.flush()
    bar.close()
    if reference is not None:
        return [(float(a), bool(g), float(k), int(c))
                for a, g, k, c in zip(ll.tolist(), greedy.tolist(), kl.tolist(), ntok.tolist())]
    return [(float(a), bool(g)) for a, g in zip(ll.tolist(), greedy.tolist())]


def _block_mask(unit: np.ndarray, sub: np.ndarray, model, device) -> torch.Tensor:
    """Additive 4D mask [B, 1, T, T]: a position sees the earlier positions of its own question's
    prefix and of its own tail; padding sees itself only (so no row is all -inf)."""
    u, s = torch.from_numpy(unit), torch.from_numpy(sub)
    T = u.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    allowed = causal & (u[:, :, None] == u[:, None, :]) & (u[:, :, None] >= 0)
    allowed &= (s[:, None, :] == 0) | (s[:, None, :] == s[:, :, None])
    allowed |= torch.eye(T, dtype=torch.bool)
    dtype = next(model.parameters()).dtype
    if not dtype.is_floating_point:
        dtype = torch.float32
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None].to(device)


def _kept_logits(model, inputs: dict, keep: torch.Tensor, state: dict) -> torch.Tensor:
    """Logits at the kept positions, in (row, position) order. Only those positions go through the
    LM head where the model takes a ``logits_to_keep`` mask."""
    logits = None
    if state["use_mask"]:
        try:
            logits = model(**inputs, logits_to_keep=keep, use_cache=False).logits
            if logits.ndim != 2:
                logits = None
                state["use_mask"] = False
        except (TypeError, IndexError) as e:
            log.debug("logits_to_keep mask unsupported (%s); computing all logits", e)
            state["use_mask"] = False
    if logits is None:
        logits = model(**inputs, use_cache=False).logits[keep]
    return logits


def keep_answers(reference, requests, progress: bool = False, **score_kw):
    """Score ``requests`` with ``reference`` once, keeping its states at the answer tokens:
    ``(ReferenceAnswers, its scoring results)`` (the reference's own evaluation comes free)."""
    from .refcache import ReferenceAnswers  # noqa: PLC0415

    kept: dict = {}
    res = score(reference, requests, progress=progress, keep_hidden=kept, **score_kw)
    return ReferenceAnswers.from_kept(reference, requests, kept), res
