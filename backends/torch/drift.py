"""The runtime drift monitor: the charter's "gradient checkpointing fallback for unstable layers".

Every ``every`` training forwards the engine keeps a copy of each reverse segment's bottom input (two
streams, (B, T, d) each, on monitored forwards only) and, when the backward has rebuilt that input from the
segment's top outputs, reports max |rebuilt - kept| / max|kept| here. Past ``threshold`` the segment's
layers switch to ``checkpoint`` (which keeps its inputs and rebuilds nothing) from the next forward on: by
the attached memory scheduler where the model has one (``force_policy``), else in ``model.policies``.

    monitor = DriftMonitor(model, every=100, threshold=1e-2)
    ...                                   # train as usual
    for event in monitor.pop_events():    # {"step", "layers", "drift", "threshold", "policy"}
        log.write(event)
"""

from __future__ import annotations

import warnings

import torch

from . import engine

DEFAULT_THRESHOLD = 1e-2  # of max|x|: far above exact streams (0) and fp32 at 96 layers (3e-3, docs/numerics.md)


class DriftMonitor:
    """Watches ``model`` (a ReversibleTransformer) from its forward hooks; ``remove()`` detaches it.

    ``checks``: every comparison made, ``{"step", "layers": [first, last], "drift"}``; ``events``: the
    fallbacks, ``{"step", "layers", "drift", "threshold", "policy"}``. ``step`` counts training forwards
    (grad enabled), from 1; the first is monitored.
    """

    def __init__(self, model, every: int = 100, threshold: float = DEFAULT_THRESHOLD, policy: str = "checkpoint"):
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every={every!r} must be a positive int (forwards between checks)")
        if not threshold > 0:
            raise ValueError(f"threshold={threshold!r} must be > 0 (relative to max|x|)")
        self.model, self.every, self.threshold, self.policy = model, every, float(threshold), policy
        self.step = 0
        self.checks: list[dict] = []
        self.events: list[dict] = []
        self._unread = 0
        self._watch = None
        self._handles = [model.register_forward_pre_hook(self._before),
                         model.register_forward_hook(self._after, always_call=True)]

    def _before(self, module, args) -> None:
        if not (torch.is_grad_enabled() and module.training):
            return
        self.step += 1
        if (self.step - 1) % self.every == 0:
            self._watch = engine.watching(self)
            self._watch.__enter__()

    def _after(self, module, args, output) -> None:
        if self._watch is not None:
            self._watch.__exit__(None, None, None)
            self._watch = None

    def record(self, layers: range, drift: float) -> None:
        """Called by the engine once a monitored segment has rebuilt its bottom input."""
        span = [layers.start, layers.stop - 1]
        self.checks.append({"step": self.step, "layers": span, "drift": drift})
        if not drift <= self.threshold:  # NaN too
            self._fall_back(layers, drift)

    def _fall_back(self, layers: range, drift: float) -> None:
        event = {"step": self.step, "layers": [layers.start, layers.stop - 1], "drift": drift,
                 "threshold": self.threshold, "policy": self.policy}
        self.events.append(event)
        self._unread += 1
        scheduler = getattr(self.model, "scheduler", None)
        if scheduler is not None:  # it sets the policies at every forward: it must know
            scheduler.force_policy(layers, self.policy)
        else:
            policies = list(self.model.policies)
            for i in layers:
                policies[i] = self.policy
            self.model.set_policy(policies)
        warnings.warn(f"reconstruction drift {drift:.3g} of max|x| in layers {layers.start}-{layers.stop - 1} at "
                      f"step {self.step} (threshold {self.threshold:g}): they run under {self.policy!r} from the "
                      "next forward on", RuntimeWarning, stacklevel=2)

    def pop_events(self) -> list[dict]:
        """The fallback events since the last call (each a JSON-ready dict), for the trainer's log."""
        new = self.events[len(self.events) - self._unread:] if self._unread else []
        self._unread = 0
        return new

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
