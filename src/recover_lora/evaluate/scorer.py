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


def _device_of(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@torch.inference_mode()
def score(model, requests: Sequence[tuple[Sequence[int], Sequence[int]]], batch_size: int | None = None,
          max_batch_tokens: int | None = None, max_length: int | None = None, progress: bool = False,
          pad_id: int = 0, desc: str = "scoring") -> list[tuple[float, bool]]:
    """(log-likelihood, is_greedy) of each (context ids, continuation ids) request.

    ``batch_size``: at most this many distinct sequences per forward (None: no cap besides the
    token budget). ``max_batch_tokens``: cap on padded tokens per forward (default 32768 on
    CUDA, 4096 on CPU). Results do not depend on the request order.
    """
    if not requests:
        return []
    device = _device_of(model)
    max_length = max_length or model_max_length(model)
    if max_batch_tokens is None:
        max_batch_tokens = 32768 if device.type == "cuda" else 4096
    # ---- requests -> unique rows (model inputs)
    row_of: dict[tuple[int, ...], int] = {}
    rows: list[tuple[int, ...]] = []
    row_keep: list[int] = []  # continuation positions needed (max over its requests)
    req_row = np.empty(len(requests), dtype=np.int64)
    req_targets: list[Sequence[int]] = []
    for i, (ctx, cont) in enumerate(requests):
        if len(ctx) == 0 or len(cont) == 0:
            raise ValueError("context and continuation must both be non-empty token lists")
        if len(cont) > max_length:
            raise ValueError(f"continuation of {len(cont)} tokens exceeds the model's {max_length}")
        inp = tuple((list(ctx) + list(cont))[-(max_length + 1):][:-1])
        r = row_of.get(inp)
        if r is None:
            r = row_of[inp] = len(rows)
            rows.append(inp)
            row_keep.append(len(cont))
        else:
            row_keep[r] = max(row_keep[r], len(cont))
        req_row[i] = r
        req_targets.append(cont)
    order = sorted(range(len(rows)), key=lambda r: (-len(rows[r]), rows[r]))
    # requests of each row
    by_row: list[list[int]] = [[] for _ in rows]
    for i, r in enumerate(req_row):
        by_row[r].append(i)
    # ---- batches
    batches: list[list[int]] = []
    cur: list[int] = []
    for r in order:
        width = len(rows[cur[0]]) if cur else len(rows[r])
        if cur and ((batch_size and len(cur) >= batch_size) or (len(cur) + 1) * width > max_batch_tokens):
            batches.append(cur)
            cur = []
        cur.append(r)
    if cur:
        batches.append(cur)

    ll = torch.zeros(len(requests), dtype=torch.float64)
    greedy = torch.zeros(len(requests), dtype=torch.bool)
    use_mask = True
    bar = None
    if progress:
        from tqdm.auto import tqdm  # noqa: PLC0415
        bar = tqdm(total=len(requests), desc=desc, unit="req", dynamic_ncols=True)
    for batch in batches:
        width = len(rows[batch[0]])
        ids = np.full((len(batch), width), pad_id, dtype=np.int64)
        keep = np.zeros((len(batch), width), dtype=bool)
        for b, r in enumerate(batch):
            row = rows[r]
            ids[b, :len(row)] = row
            keep[b, len(row) - row_keep[r]:len(row)] = True
        # flat index (in the kept-position order: batch-major, then position) of each position
        flat = np.cumsum(keep.reshape(-1)).reshape(keep.shape) - 1
        sel_pos: list[np.ndarray] = []
        sel_tgt: list[np.ndarray] = []
        sel_req: list[np.ndarray] = []
        req_ids: list[int] = []
        for b, r in enumerate(batch):
            n = len(rows[r])
            for i in by_row[r]:
                tgt = np.asarray(req_targets[i], dtype=np.int64)
                k = len(tgt)
                sel_pos.append(flat[b, n - k:n])
                sel_tgt.append(tgt)
                sel_req.append(np.full(k, len(req_ids), dtype=np.int64))
                req_ids.append(i)
        input_ids = torch.from_numpy(ids).to(device)
        keep_t = torch.from_numpy(keep).to(device)
        logits = None
        if use_mask:
            try:
                logits = model(input_ids=input_ids, logits_to_keep=keep_t, use_cache=False).logits
                if logits.ndim != 2:
                    logits = None
                    use_mask = False
            except (TypeError, IndexError) as e:
                log.debug("logits_to_keep mask unsupported (%s); computing all logits", e)
                use_mask = False
        if logits is None:
            logits = model(input_ids=input_ids, use_cache=False).logits[keep_t]
        pos = torch.from_numpy(np.concatenate(sel_pos)).to(device)
        tgt = torch.from_numpy(np.concatenate(sel_tgt)).to(device)
        seg = torch.from_numpy(np.concatenate(sel_req)).to(device)
        lp_all = torch.log_softmax(logits.float(), dim=-1)
        del logits
        lp = lp_all[pos, tgt]
        miss = (lp_all[pos].argmax(dim=-1) != tgt).to(torch.int64)
        del lp_all
        n_req = len(req_ids)
        sums = torch.zeros(n_req, dtype=torch.float64, device=device).index_add_(0, seg, lp.double())
        misses = torch.zeros(n_req, dtype=torch.int64, device=device).index_add_(0, seg, miss)
        idx = torch.as_tensor(req_ids, dtype=torch.long)
        ll[idx] = sums.cpu()
        greedy[idx] = (misses == 0).cpu()
        if bar is not None:
            bar.update(n_req)
    if bar is not None:
        bar.close()
    return [(float(a), bool(g)) for a, g in zip(ll.tolist(), greedy.tolist())]
