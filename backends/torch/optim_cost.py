"""What each optimizer option costs in memory: the torch cost model's step replayed with the optimizer's state,
its gradients' lifetimes and its update's temporaries (issue #21).

The options (``OPTIMIZER_OPTIONS``), as ``LongContextTrainer(optimizer=..., optimizer_in_backward=...)`` and
``revnet_torch.optim.OptimizerInBackward`` run them:

=============================  ========  =============  ============================================
option                         weights   moments        gradients
=============================  ========  =============  ============================================
adamw                          fp32      fp32 (8 B)     all alive at the end of the backward
adamw_in_backward              fp32      fp32 (8 B)     freed as each node's backward returns
adamw_in_backward_bf16         bf16      fp32 (8 B)     as above; the update is stochastically rounded
adamw8bit                      fp32      8-bit (~2 B)   all alive at the end of the backward
adamw8bit_in_backward          fp32      8-bit (~2 B)   freed as each node's backward returns
adamw8bit_in_backward_bf16     bf16      8-bit (~2 B)   as above, stochastically rounded
=============================  ========  =============  ============================================

How it is priced: the same tape as ``CostModel.simulate`` (``cost._Step``), with the state added as a constant
(it is alive the whole step). Inside the backward, a parameter's gradient is freed by its hook once autograd
has accumulated it, which is when the node that produced it returns; the tape frees every live gradient when
the next backward phase begins (a reverse layer returns all its parameters' gradients at once), each after
the temporaries of its own update. Update temporaries, per parameter of n values: fused AdamW in place, none;
bf16 with stochastic rounding, ``SR_BYTES_PER_VALUE`` (the fp32 stand-in, the fp32 gradient, the rounding's
int32 noise and sums, its masks); 8-bit, ``EIGHT_BIT_BYTES_PER_VALUE`` over at most ``CHUNK_ELEMENTS`` values
(the fp32 moments, gradient, weights and quantiser buffers of one chunk). Not priced: gradient accumulation
inside the backward (the hooks are disarmed on the micro-batches before the last: every gradient exists then,
as for ``adamw``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Sequence

from revnet_core.errors import ConfigError
from revnet_core.memory import Tape

from .optim8bit import CHUNK_ELEMENTS, DEFAULT_BLOCK_SIZE, check_block_size

SR_BYTES_PER_VALUE = 23  # fp32 stand-in, fp32 grad, int32 noise, rounded bits, masks, where, bf16: from the code
EIGHT_BIT_BYTES_PER_VALUE = 44  # g, m, v, x, denom (fp32), the quantiser's fp32 and int64 buffers: from the code


@dataclass(frozen=True)
class OptimizerOption:
    """One way to run AdamW: 8-bit moments or fp32, the step inside the backward or after it, bf16 weights."""

    name: str
    eight_bit: bool
    in_backward: bool
    bf16_weights: bool

    def trainer_kwargs(self) -> dict:
        """The ``LongContextTrainer`` keywords of this option (bf16 weights: the model is cast by the caller)."""
        return {"optimizer": "adamw8bit" if self.eight_bit else "adamw", "optimizer_in_backward": self.in_backward}


OPTIMIZER_OPTIONS = {o.name: o for o in (
    OptimizerOption("adamw", False, False, False),
    OptimizerOption("adamw_in_backward", False, True, False),
    OptimizerOption("adamw_in_backward_bf16", False, True, True),
    OptimizerOption("adamw8bit", True, False, False),
    OptimizerOption("adamw8bit_in_backward", True, True, False),
    OptimizerOption("adamw8bit_in_backward_bf16", True, True, True),
)}


def optimizer_option(name: str) -> OptimizerOption:
    if name not in OPTIMIZER_OPTIONS:
        raise ConfigError(f"optimizer option {name!r} is not one of {list(OPTIMIZER_OPTIONS)}")
    return OPTIMIZER_OPTIONS[name]


def state_bytes(parameter_count: int, tensors: int, option: str, block_size: int = DEFAULT_BLOCK_SIZE) -> int:
    """Bytes of AdamW's two moments for ``parameter_count`` values in ``tensors`` parameter tensors: fp32, 8 a
    value; 8-bit, 2 a value plus an fp32 scale per block of each moment (a tensor's last block may be partial)."""
    opt = optimizer_option(option)
    if not opt.eight_bit:
        return 8 * parameter_count
    check_block_size(block_size)
    blocks = math.ceil(parameter_count / block_size) + tensors  # at most one partial block per tensor
    return 2 * parameter_count + 2 * 4 * blocks


def update_transient_bytes(numel: int, option: str) -> int:
    """Temporaries of one parameter's update (``numel`` values) beyond the parameter, its gradient and state."""
    opt = optimizer_option(option)
    if opt.eight_bit:
        chunk = min(numel, CHUNK_ELEMENTS)
        extra = EIGHT_BIT_BYTES_PER_VALUE * chunk
        # bf16 weights: the fp32 stand-in and gradient cover the whole parameter, then the rounding's buffers.
        return extra + (SR_BYTES_PER_VALUE * numel if opt.bf16_weights else 0)
    return SR_BYTES_PER_VALUE * numel if opt.bf16_weights else 0  # fused AdamW updates in place


class _HookTape(Tape):
    """A tape on which each parameter's gradient is consumed by its hook: from the loss head's backward on, the
    start of every phase first runs the updates of the gradients alive (one at a time) and frees them."""

    def __init__(self, update_bytes, value_bytes: int):
        super().__init__()
        self.update_bytes = update_bytes  # numel -> temporaries of that parameter's update
        self.value_bytes = value_bytes  # bytes of one gradient value (the parameter dtype)
        self.backward_started = False
        self.largest_update = 0

    def set_label(self, label: str) -> None:
        if self.backward_started:
            self.consume_gradients()
        if label == "loss head backward":
            self.backward_started = True
        super().set_label(label)

    def consume_gradients(self) -> None:
        for name, entry in list(self.live.items()):
            if entry[1] != "gradients":
                continue
            numel = entry[0] // self.value_bytes
            tmp = self.update_bytes(numel)
            self.largest_update = max(self.largest_update, tmp)
            self.free(self.alloc(f"{name}.update", tmp, "optimizer_step"))
            while name in self.live:
                self.free(name)


def optimizer_peak_bytes(cm, policies: Sequence[str] | str, option: str = "adamw",
                         block_size: int = DEFAULT_BLOCK_SIZE) -> int:
    """Peak bytes of one training step of ``cm`` (a ``revnet_torch.cost.CostModel``) under ``policies`` with the
    optimizer ``option`` (``OPTIMIZER_OPTIONS``); ``option="adamw"`` with fp32 weights is ``cm.peak_bytes``."""
    from .cost import CostModel, _Step  # the replay this prices; cost imports this module lazily too

    opt = optimizer_option(option)
    workload = replace(cm.workload, optimizer="none")  # the state is added below, in its own dtype
    if opt.bf16_weights:
        workload = replace(workload, param_dtype="bfloat16")
    base = CostModel(cm.config, workload)
    plan = base._plan(policies)
    value_bytes = base.sizes.p
    tape = _HookTape(lambda n: update_transient_bytes(n, option), value_bytes) if opt.in_backward else Tape()
    base._step(plan, _Step(base, tape))
    peak = tape.peak
    if opt.in_backward:
        tape.set_label("after the backward")  # the embedding's gradient, the last, is consumed here
        peak = tape.peak
    elif opt.eight_bit:  # after the backward: one parameter at a time, every gradient alive
        largest = base.sizes.V * base.sizes.d  # the embedding and the head: the largest tensors
        peak = max(peak, tape.total + update_transient_bytes(largest, option))
    tensors = 8 * cm.config.num_layers + 3  # a layer's 4 matrices and 2 norms (+ biases); embedding, head, norm
    return peak + state_bytes(base.parameter_count(), tensors, option, block_size)


# --- choosing an option (the advisor and OptimalConfigs ask through the cost model) ----------------------
# In the order they are preferred: the step inside the backward changes only what clipping does (by the
# previous step's norm), 8-bit moments add a small measured loss gap (docs/training.md), bf16 weights rely
# on stochastic rounding. With gradient accumulation every gradient exists during the earlier micro-batches
# whatever the option, so only the state can shrink.
LADDER = ("adamw", "adamw_in_backward", "adamw8bit_in_backward", "adamw_in_backward_bf16",
          "adamw8bit_in_backward_bf16")
ACCUMULATING_LADDER = ("adamw", "adamw8bit")
FILL = 0.85  # an option is taken when its predicted peak fills at most this share of the budget
HOW = {
    "adamw": "AdamW after the backward (fp32 moments)",
    "adamw8bit": "8-bit AdamW moments: LongContextTrainer(optimizer='adamw8bit')",
    "adamw_in_backward": "AdamW inside the backward: LongContextTrainer(optimizer_in_backward=True)",
    "adamw8bit_in_backward": "8-bit AdamW inside the backward: LongContextTrainer(optimizer='adamw8bit', "
                             "optimizer_in_backward=True)",
    "adamw_in_backward_bf16": "bf16 weights, AdamW inside the backward with stochastic rounding: "
                              "OptimizerInBackward(params, torch.optim.AdamW, stochastic_rounding=True) on "
                              "model.to(torch.bfloat16)",
    "adamw8bit_in_backward_bf16": "bf16 weights, 8-bit AdamW inside the backward with stochastic rounding: "
                                  "OptimizerInBackward(params, AdamW8bit, stochastic_rounding=True) on "
                                  "model.to(torch.bfloat16)",
}


def choose_optimizer(cm, policies: Sequence[str], budget: int,
                     accumulating: bool = False) -> tuple[str, dict[str, int]]:
    """The first option of ``LADDER`` (``ACCUMULATING_LADDER``) whose peak under ``policies`` fills at most
    ``FILL`` of ``budget``; else the first that fits at all; else the leanest. Returns (option, {option: peak}
    for those priced). A step without AdamW (``workload.optimizer`` "sgd" or "none"): "adamw", unpriced."""
    if cm.workload.optimizer != "adamw":
        return "adamw", {"adamw": cm.peak_bytes(list(policies))}
    ladder = ACCUMULATING_LADDER if accumulating else LADDER
    peaks: dict[str, int] = {}
    for name in ladder:
        peaks[name] = cm.optimizer_peak_bytes(list(policies), name)
        if peaks[name] <= FILL * budget:
            return name, peaks
    fits = [name for name in ladder if peaks[name] <= budget]
    return (fits[0] if fits else ladder[-1]), peaks


class WithOptimizer:
    """A cost model whose ``peak_bytes`` includes an optimizer option (what the planner asks); everything else
    is the cost model's own (the option changes no compute)."""

    def __init__(self, cm, option: str):
        optimizer_option(option)
        self.cm, self.option = cm, option
        self._memo: dict[tuple, int] = {}

    def peak_bytes(self, policies) -> int:
        key = tuple(policies)
        if key not in self._memo:
            self._memo[key] = self.cm.optimizer_peak_bytes(list(key), self.option)
        return self._memo[key]

    def __getattr__(self, name):
        return getattr(self.cm, name)
