"""What a method is: data plus a few small functions (the damage ops' pattern), so ``recover``
reads the same for every method and a new one is one module and one registry line."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Method:
    """``student(run)`` sets ``run.student`` (and ``run.n_train``, ``run.plan``, ``run.snapshot``);
    ``train(run, metrics)`` trains it and returns (TrainState, the method's own summary or None);
    ``identity(cfg)`` the config sections that determine its result; ``validate(cfg)`` checks that
    need no model. ``run`` is recover's run state (``recover.Run``)."""

    name: str
    adapters: bool  # trains LoRA adapters; False: every weight of the degraded model
    synthetic: bool  # trains on the reference's synthetic text; False: on labeled train splits
    student: Callable[[Any], None]
    train: Callable[[Any, Any], tuple[Any, dict | None]]
    identity: Callable[[Any], dict]
    validate: Callable[[Any], None] = lambda cfg: None
