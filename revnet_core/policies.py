"""The one table of memory policies: what each layer keeps for its backward, and what it recomputes.

Config, planner, cost models, engines and schedulers of every backend read their vocabulary from here; a
name appears in no other list. A policy is a per-layer choice; ``run_layers`` of every backend implements
each one itself (schedulers choose policies, they never patch a block).
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigError


@dataclass(frozen=True)
class Policy:
    """One per-layer policy. ``recomputes``: which blocks the backward runs again ("" none, "layer" both,
    "attention" or "ffn" one); ``needs_inverse``: only a layer whose couplings invert can take it."""

    name: str
    keeps: str  # what the forward leaves alive for the backward, in words
    recomputes: str
    needs_inverse: bool = False
    keeps_attention: bool = False  # the attention kernel's output and log-sum-exp: its backward needs no rerun


TABLE = (
    Policy("store", "every activation autograd saves (plain training)", ""),
    Policy("recompute_ffn", "the layer's activations but the FFN's; the FFN's input instead", "ffn"),
    Policy("recompute_attention", "the layer's activations but attention's; attention's input instead",
           "attention"),
    Policy("checkpoint", "the layer's two input streams", "layer"),
    Policy("reverse_keep_attention", "the attention output and its log-sum-exp per head (2 x d + 4 x heads "
           "bytes a token in bf16); inputs are rebuilt from the outputs", "layer", needs_inverse=True,
           keeps_attention=True),
    Policy("reverse", "nothing: inputs are rebuilt from the outputs", "layer", needs_inverse=True),
)
BY_NAME = {p.name: p for p in TABLE}
NAMES = tuple(BY_NAME)  # most memory first
DEFAULT = "reverse"
RECOMPUTING = tuple(p.name for p in TABLE if p.recomputes)
# No block recomputed alone; reverse_keep_attention is left out: only some layers can take it (the backend's
# refusal says which), so it is offered per layer (planner's ``keepable``), never as a blanket choice.
WHOLE_LAYER = tuple(p.name for p in TABLE if p.recomputes in ("", "layer") and not p.keeps_attention)
REVERSING = tuple(p.name for p in TABLE if p.needs_inverse)  # rebuilt from their outputs: one segment
KEEPING_ATTENTION = tuple(p.name for p in TABLE if p.keeps_attention)

# The planner's menus, least recompute first: each granularity adds finer options to the one before.
GRANULARITIES = {
    "layer": ("store", "reverse"),
    "attention": ("store", "recompute_attention", "reverse"),
    "block": ("store", "recompute_ffn", "recompute_attention", "reverse"),
}
# Directives a LayerScheduler accepts besides the policies: resolved into policies at each forward.
DIRECTIVES = ("recompute", "adaptive")  # recompute: reverse where the layer inverts, else checkpoint
# The JAX scheduler's names (the user's README): each a policy, "selective" with XLA's saveable matmuls.
REMATERIALIZATION = {"reverse": "reverse", "full": "checkpoint", "selective": "checkpoint", "none": "store"}


def check(policy: str) -> str:
    """``policy`` if it is in the table, else ConfigError listing the names (a typo must not run as another)."""
    if policy not in BY_NAME:
        raise ConfigError(f"policy={policy!r} is not one of {list(NAMES)}")
    return policy


def check_all(policies, num_layers: int) -> tuple[str, ...]:
    """One policy per layer: a name for all, or a sequence of ``num_layers`` names."""
    out = (policies,) * num_layers if isinstance(policies, str) else tuple(policies)
    if len(out) != num_layers:
        raise ConfigError(f"got {len(out)} policies for {num_layers} layers")
    for p in out:
        check(p)
    return out


def summary(policies) -> str:
    """``"store x6, reverse x18"``: a plan in layer order, runs collapsed."""
    runs: list[list] = []
    for p in policies:
        if runs and runs[-1][0] == p:
            runs[-1][1] += 1
        else:
            runs.append([p, 1])
    return ", ".join(f"{p} x{n}" for p, n in runs)
