"""Choose a policy per layer: the fastest step whose predicted peak fits a memory budget.

Each layer has a menu of options, from the most memory and least compute (``store``) to the least memory and
most compute (``reverse``, or ``checkpoint`` where a layer cannot be inverted), and, at finer granularity, a
stored layer with one block recomputed (``recompute_ffn``, ``recompute_attention``). A plan is one option per
layer; the cost model (a backend's ``cost`` model, e.g. ``revnet_torch.cost.CostModel``, or anything with ``peak_bytes(plan)`` and
``step_time(plan)``) prices it.

Where the memory goes: saved activations of the layers below a layer are still alive while that layer runs
its backward, and a stored layer's own backward needs less than a recomputing one. So for a given set of
options, putting the memory-hungry ones on the *top* layers never raises the peak (exchange argument: swap a
stored layer at i below a recomputed one at j > i; the phases between lose the stored layer's activations,
and at j the stored layer's smaller backward working set replaces the recompute's). Plans are therefore
built top-down: the top layers get the costliest options, the bottom ones the cheapest.

Why greedy is optimal when all layers are equal (two options, store and reverse): every stored layer saves
the same time t and, placed top-down, the peak of "top k stored" is non-decreasing in k. The step time of any
plan with k stored layers is T_reverse - k*t whatever their placement, and the top-k placement has the lowest
peak among plans with k stored layers (above). So the fastest plan that fits is "top k stored" with the
largest k that fits, which is what adding stored layers from the top until the next would not fit returns
(found here by bisection on k). With more options, every split of the layers among the options (placed
top-down) is tried when there are at most MAX_ENUMERATED splits, which is exact by the same placement
argument; beyond that a greedy upgrades by time saved per byte (a knapsack heuristic).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Iterable, Protocol, Sequence

from .policies import GRANULARITIES, KEEPING_ATTENTION, RECOMPUTING
from .policies import summary as plan_summary

STRATEGIES = ("aggressive", "balanced", "adaptive")

class Priced(Protocol):
    """What the planner needs from a cost model."""

    def peak_bytes(self, policies: Sequence[str]) -> int: ...

    def step_time(self, policies: Sequence[str]) -> float: ...


@dataclass(frozen=True)
class Plan:
    """One option per layer and what the cost model predicts for it."""

    policies: tuple[str, ...]
    peak_bytes: int
    step_time: float
    relative_time: float  # step time / the all-store plan's
    budget: int | None
    fits: bool
    strategy: str
    granularity: str
    notes: tuple[str, ...] = field(default=())

    @property
    def recomputed_layers(self) -> list[int]:
        """Indices of layers that recompute anything in the backward."""
        return [i for i, p in enumerate(self.policies) if p in RECOMPUTING]

    def summary(self) -> str:
        from .memory import format_bytes

        budget = "no budget" if self.budget is None else f"budget {format_bytes(self.budget)}"
        fit = "fits" if self.fits else "does NOT fit"
        return (f"{self.strategy} plan ({self.granularity}): {plan_summary(self.policies)}; predicted peak "
                f"{format_bytes(self.peak_bytes)}, {fit} ({budget}); step compute {self.relative_time:.3f}x of "
                f"storing every layer")


def layer_options(granularity: str, invertible: bool = True, keepable: bool = False) -> tuple[str, ...]:
    """The menu for one layer, most memory first. A layer that cannot be inverted checkpoints instead;
    ``keepable`` (the backend can keep this layer's attention for its backward) adds
    ``reverse_keep_attention`` before ``reverse``."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"recompute_granularity={granularity!r} is not one of {list(GRANULARITIES)}")
    opts = GRANULARITIES[granularity]
    if not invertible:
        return tuple("checkpoint" if o == "reverse" else o for o in opts)
    if keepable:
        at = opts.index("reverse")
        opts = opts[:at] + KEEPING_ATTENTION + opts[at:]
    return opts


class _Evaluator:
    """Memoised peak and time of plans."""

    def __init__(self, model: Priced):
        self.model = model
        self.cache: dict[tuple, tuple[int, float]] = {}

    def __call__(self, plan: Sequence[str]) -> tuple[int, float]:
        key = tuple(plan)
        if key not in self.cache:
            self.cache[key] = (int(self.model.peak_bytes(list(key))), float(self.model.step_time(list(key))))
        return self.cache[key]


def _ordered(menus: list[tuple[str, ...]], ev: _Evaluator) -> list[list[str]]:
    """Each layer's options ordered from least memory to most, dropping options that cost more memory and
    more time than another (never worth choosing)."""
    base = [m[-1] for m in menus]
    out = []
    for i, menu in enumerate(menus):
        priced = []
        for o in menu:
            plan = list(base)
            plan[i] = o
            priced.append((ev(plan), o))
        priced.sort(key=lambda x: (x[0][0], -x[0][1]))
        kept: list[str] = []
        best_time = float("inf")
        for (peak, time), o in priced:
            if time < best_time:
                kept.append(o)
                best_time = time
        out.append(kept)
    return out


def plan_layers(model: Priced, num_layers: int, budget: int | None, *, strategy: str = "adaptive",
                granularity: str = "layer", invertible: Sequence[bool] | None = None,
                fixed: dict[int, str] | None = None, keepable: Sequence[bool] | None = None) -> Plan:
    """The fastest plan under ``budget`` bytes (see the module docstring).

    strategy: ``aggressive`` recomputes every layer (least memory, no budget needed); ``balanced`` aims at the
    midpoint between the least-memory and the all-store peaks (capped by ``budget``); ``adaptive`` uses the
    whole ``budget``. ``invertible[i]`` False makes layer i checkpoint instead of reverse. ``fixed`` pins
    layers to a policy (LayerScheduler's explicit choices). ``keepable[i]`` True offers layer i
    ``reverse_keep_attention`` (the backend says it can run it; default: no layer).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r} is not one of {list(STRATEGIES)}")
    if strategy == "adaptive" and budget is None:
        raise ValueError("strategy='adaptive' needs a memory budget (bytes)")
    if budget is not None and budget <= 0:
        raise ValueError(f"memory budget={budget!r} must be a positive number of bytes")
    invertible = list(invertible) if invertible is not None else [True] * num_layers
    fixed = dict(fixed or {})
    ev = _Evaluator(model)
    keepable = list(keepable) if keepable is not None else [False] * num_layers
    menus = [(fixed[i],) if i in fixed else layer_options(granularity, invertible[i], keepable[i])
             for i in range(num_layers)]
    orders = _ordered(menus, ev)
    least = [o[0] for o in orders]
    most = [o[-1] for o in orders]
    store_time = ev(["store"] * num_layers)[1]
    notes: list[str] = []
    target = budget
    if strategy == "aggressive":
        return _make(least, ev, budget, strategy, granularity, store_time, notes)
    if strategy == "balanced":
        mid = (ev(least)[0] + ev(most)[0]) // 2
        target = mid if budget is None else min(budget, mid)
        notes.append(f"balanced target {target / 2**30:.2f} GiB (midpoint of least-memory and all-store)")
    if ev(least)[0] > target:
        notes.append("even the least-memory plan exceeds the budget: reduce sequence length or batch, "
                     "or use a larger device")
        return _make(least, ev, budget, strategy, granularity, store_time, notes)
    plan = _search(orders, ev, target)
    return _make(plan, ev, budget, strategy, granularity, store_time, notes)


def _make(plan, ev, budget, strategy, granularity, store_time, notes) -> Plan:
    peak, time = ev(plan)
    return Plan(tuple(plan), peak, time, time / store_time if store_time else 1.0, budget,
                budget is None or peak <= budget, strategy, granularity, tuple(notes))


MAX_ENUMERATED = 120  # plans tried exhaustively (as option counts, placed top-down) before falling back to greedy


def _search(orders: list[list[str]], ev: _Evaluator, target: int) -> list[str]:
    """Equal menus: every split of the layers among the options, most memory on top, when there are few
    (exact, by the placement argument); otherwise, and for unequal menus, the greedy."""
    L = len(orders)
    m = len(orders[0])
    uniform = all(o == orders[0] for o in orders)
    if not uniform or m == 2 or math.comb(L + m - 1, m - 1) > MAX_ENUMERATED:
        return _greedy(orders, ev, target)
    best = None
    # A split as the layers' option indices, bottom first and non-decreasing (the cheapest options at the
    # bottom); reversed, the splits with the most memory-hungry layers come first and win ties in time.
    for levels in reversed(list(itertools.combinations_with_replacement(range(m), L))):
        plan = [orders[0][j] for j in levels]
        peak, time = ev(plan)
        if peak <= target and (best is None or time < best[0]):
            best = (time, plan)
    return best[1] if best else [o[0] for o in orders]


def _greedy(orders: list[list[str]], ev: _Evaluator, target: int) -> list[str]:
    """Upgrade layers top-down while the plan fits: each step moves the topmost layer of some option to any
    costlier option, taking the move that saves the most time per extra byte of peak; then a local search
    moves single layers between options while that makes the plan faster and it still fits. Equal two-option
    menus reduce to bisection on the number of stored layers."""
    L = len(orders)
    plan = lambda lv: [orders[i][lv[i]] for i in range(L)]  # noqa: E731
    if all(len(o) == 2 for o in orders) and all(o == orders[0] for o in orders):
        # Top k layers upgraded; the peak is non-decreasing in k: bisect the largest k that fits.
        lo, hi = 0, L
        while lo < hi:
            k = (lo + hi + 1) // 2
            if ev(plan([1 if i >= L - k else 0 for i in range(L)]))[0] <= target:
                lo = k
            else:
                hi = k - 1
        return plan([1 if i >= L - lo else 0 for i in range(L)])
    level = [0] * L
    peak, time = ev(plan(level))

    def moves(lv, upward_only):
        seen = set()
        for i in reversed(range(L)):  # the topmost layer at each level keeps the top-down order
            key = (lv[i], tuple(orders[i]))
            if key in seen:
                continue
            seen.add(key)
            for new in range(len(orders[i])):
                if new == lv[i] or (upward_only and new < lv[i]):
                    continue
                cand = list(lv)
                cand[i] = new
                yield cand

    while True:  # greedy by time saved per byte
        best = None
        for cand in moves(level, True):
            p, tm = ev(plan(cand))
            if p > target or tm >= time:
                continue
            score = (time - tm) / max(p - peak, 1)
            if best is None or score > best[0]:
                best = (score, cand, p, tm)
        if best is None:
            break
        _, level, peak, time = best
    improved = True
    while improved:  # local search: any single move that is faster and fits
        improved = False
        for cand in moves(level, False):
            p, tm = ev(plan(cand))
            if p <= target and tm < time:
                level, peak, time, improved = cand, p, tm, True
                break
    return plan(level)


def frontier(model: Priced, num_layers: int, granularity: str = "layer",
             budgets: Iterable[int] | None = None, points: int = 12) -> list[Plan]:
    """Plans across budgets from the least-memory to the all-store peak: the predicted memory/time frontier."""
    least = plan_layers(model, num_layers, None, strategy="aggressive", granularity=granularity)
    if budgets is None:
        hi = model.peak_bytes(["store"] * num_layers)
        lo = least.peak_bytes
        budgets = [int(lo + (hi - lo) * k / (points - 1)) for k in range(points)]
    return [plan_layers(model, num_layers, b, granularity=granularity) for b in budgets]
