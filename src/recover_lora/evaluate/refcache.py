"""The reference's answers, kept: its last hidden states at every continuation token of a request set.

The answer-token KL of a model to its reference needs the reference's distribution at each answer
token. Running the reference beside every model doubles an evaluation; keeping its full
distributions does not fit (150k answer tokens x 49k-262k vocabulary). Its final hidden states,
the LM head's input, do (hidden size floats a token: ~350 MB for SmolLM2 on 500 items a task), and
the head turns them back into the same logits (checked when built). A study evaluates its
reference once, keeps these, and every later model's answer-token KL costs one head product at the
answer positions instead of a second forward pass.

    cache, results = keep_answers(reference, requests)       # scorer.py: one scoring pass of the reference
    cache.save(path); cache = ReferenceAnswers.load(path, reference)
    score(model, requests, reference=cache)                  # same KL as reference=the model itself
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..utils import RecoverLoraError, atomic_write_bytes, log


def request_key(ctx: Sequence[int], cont: Sequence[int]) -> str:
    """A request's identity: the hash of its context and continuation token ids."""
    h = hashlib.sha1(np.asarray(list(ctx), dtype=np.int64).tobytes())
    h.update(b"|")
    h.update(np.asarray(list(cont), dtype=np.int64).tobytes())
    return h.hexdigest()[:20]


def head_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """The model's logits from its LM head's input (the final soft-capping too, where a model has one)."""
    from ..forward import lm_head_of  # noqa: PLC0415

    return lm_head_of(model)(hidden.to(model.get_output_embeddings().weight.dtype))


class ReferenceAnswers:
    """Per request (by :func:`request_key`): the reference's LM-head inputs at its continuation tokens."""

    def __init__(self, model, keys: list[str], offsets: np.ndarray, hidden: torch.Tensor, fingerprint: str = ""):
        self.model = model  # the reference: its head turns the kept states into logits
        self.index = {k: i for i, k in enumerate(keys)}
        self.keys, self.offsets, self.hidden, self.fingerprint = keys, offsets, hidden, fingerprint

    def __len__(self) -> int:
        return len(self.keys)

    def has(self, requests) -> list[str]:
        """The keys of ``requests`` this cache lacks."""
        return [k for k in (request_key(c, t) for c, t in requests) if k not in self.index]

    def hidden_for(self, ctx: Sequence[int], cont: Sequence[int]) -> torch.Tensor:
        i = self.index.get(request_key(ctx, cont))
        if i is None:
            raise RecoverLoraError("the reference's answers were kept for other requests: this one is not among them "
                                   "(another task set, limit, few-shot or tokenizer); build them again")
        return self.hidden[self.offsets[i]:self.offsets[i + 1]]

    def log_probs(self, hidden: torch.Tensor) -> torch.Tensor:
        """The reference's log-probabilities from kept states (float32)."""
        w = self.model.get_output_embeddings().weight
        return torch.log_softmax(head_logits(self.model, hidden.to(w.device)).float(), dim=-1)

    @classmethod
    def from_kept(cls, reference, requests, kept: dict) -> "ReferenceAnswers":
        """From what ``score(reference, requests, keep_hidden=kept)`` filled in."""
        keys, sizes, parts, seen = [], [0], [], set()
        for i, (ctx, cont) in enumerate(requests):
            k = request_key(ctx, cont)
            if k in seen:
                continue
            seen.add(k)
            keys.append(k)
            parts.append(kept[i])
            sizes.append(len(cont))
        hidden = torch.cat(parts).float().cpu() if parts else torch.zeros(0)
        return cls(reference, keys, np.cumsum(sizes), hidden, _fingerprint(reference))

    def save(self, path: str | Path) -> None:
        import io  # noqa: PLC0415

        buf = io.BytesIO()
        torch.save({"keys": self.keys, "offsets": torch.from_numpy(self.offsets), "hidden": self.hidden,
                    "fingerprint": self.fingerprint}, buf)
        atomic_write_bytes(Path(path), buf.getvalue())

    @classmethod
    def load(cls, path: str | Path, reference) -> "ReferenceAnswers":
        d = torch.load(path, map_location="cpu", weights_only=True)
        if d.get("fingerprint") and d["fingerprint"] != _fingerprint(reference):
            raise RecoverLoraError(f"{path} was kept from another reference model; delete it to build it again")
        log.info("reference answers: %d requests, %d tokens from %s", len(d["keys"]), len(d["hidden"]), path)
        return cls(reference, d["keys"], d["offsets"].numpy(), d["hidden"], d.get("fingerprint", ""))


def _fingerprint(model) -> str:
    from ..load import fingerprint  # noqa: PLC0415

    return fingerprint(model)
