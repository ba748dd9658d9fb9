"""AdamW with 8-bit state: block-wise quantised first and second moments (Dettmers et al. 2022, "8-bit
Optimizers via Block-wise Quantization").

Each moment is kept as one uint8 code per value plus one fp32 scale (the block's absolute maximum) per
``block_size`` consecutive values of the flattened parameter: 2 bytes a parameter for both moments plus
8 / ``block_size`` for the scales (2.03 at 256) instead of fp32 AdamW's 8. A code indexes a *dynamic* map:
values spread over seven decades (10^-e times a linear fraction, the fraction's resolution halving with each
decade), so small entries of a block keep a relative precision that a linear 8-bit grid would round to zero.
The first moment is signed; the second is non-negative and takes an unsigned map, whose sign bit buys one more
bit of fraction.

An update dequantises the parameter's two moments (in chunks of blocks, so the fp32 temporaries are bounded
by ``CHUNK_ELEMENTS`` however large the parameter), takes the AdamW step in fp32 with the fresh moments,
and requantises them (round to nearest code). One deviation: a non-zero second moment is never rounded to
code 0 (it takes the smallest non-zero code), so ``m / sqrt(v)`` cannot blow up by a value rounded away.

Why not ``torchao.optim.AdamW8bit``: it runs on the CPU (torchao 0.18 under torch 2.13), but compiles its
step with inductor for every parameter shape (26 s for four shapes on two CPU cores, a C compiler needed),
needs the learning rate as a tensor, and is not installed by the quick start or CI. This module is plain
torch, so the same code is tested in CI and runs on the GPU.
"""

from __future__ import annotations

import functools
import math
from typing import Iterable

import torch

from revnet_core.errors import ConfigError

DEFAULT_BLOCK_SIZE = 256  # the scales cost 4/256 bytes a value; 2048 (bitsandbytes') is allowed too
MIN_BLOCK, MAX_BLOCK = 64, 65536
CHUNK_ELEMENTS = 1 << 20  # values updated at once: bounds the update's temporaries (~44 MiB) for any size
DECADES = 7  # the dynamic map spans 10^-7 .. 1 of the block's absmax


@functools.lru_cache(maxsize=None)
def _dynamic_values(signed: bool) -> tuple[float, ...]:
    """The map's sorted values in [-1, 1] (signed: 255 of them, 0 and +-1 included) or [0, 1] (256)."""
    bits = 7 if signed else 8  # bits after the sign
    magnitudes = []
    for e in range(min(bits, DECADES + 1)):
        # Decade e holds 2^(bits-1-e) values: the right ends of equal steps over (0.1, 1] times 10^-e, so the
        # largest code is exactly 1 (a block's absmax is represented exactly).
        n = 2 ** (bits - 1 - e)
        magnitudes += [10.0 ** -e * (0.1 + 0.9 * (k + 1) / n) for k in range(n)]
    values = sorted(set([0.0] + magnitudes + ([-m for m in magnitudes] if signed else [])))
    return tuple(values)


@functools.lru_cache(maxsize=None)
def _map_tensors(signed: bool, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, boundaries) on ``device``: code k stands for values[k]; boundaries are midpoints, for nearest."""
    values = torch.tensor(_dynamic_values(signed), dtype=torch.float32, device=device)
    return values, (values[1:] + values[:-1]) / 2


def dynamic_map(signed: bool) -> torch.Tensor:
    """The dynamic quantisation map (fp32, sorted): 255 values in [-1, 1] signed, 256 in [0, 1] unsigned."""
    return _map_tensors(signed, torch.device("cpu"))[0].clone()


def check_block_size(block_size) -> int:
    """``block_size`` if it is a power of two in [64, 65536], else a ConfigError saying why."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or not MIN_BLOCK <= block_size <= MAX_BLOCK \
            or block_size & (block_size - 1):
        raise ConfigError(f"block_size={block_size!r} must be a power of two in [{MIN_BLOCK}, {MAX_BLOCK}] (smaller "
                          "blocks spend more on scales than they gain: 4 bytes of scale per block)")
    return block_size


def quantize_blockwise(x: torch.Tensor, block_size: int, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """float ``x`` (any shape, n values) -> (codes uint8 (n,), scales fp32 (ceil(n / block_size),)).

    Each block of the flattened ``x`` is divided by its absmax and rounded to the nearest map value; an
    all-zero block has scale 0. Unsigned: ``x`` must be >= 0; non-zero values never take code 0."""
    values, bounds = _map_tensors(signed, x.device)
    flat = x.reshape(-1).float()
    n = flat.numel()
    pad = -n % block_size
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, block_size)  # (nblocks, block_size)
    scales = blocks.abs().amax(dim=1)
    normed = blocks / torch.where(scales > 0, scales, 1.0).unsqueeze(1)
    codes = torch.bucketize(normed, bounds)
    if not signed:  # keep every non-zero second moment non-zero: m / sqrt(v) stays bounded
        codes = torch.where(normed > 0, codes.clamp(min=1), codes)
    return codes.view(-1)[:n].to(torch.uint8), scales


def dequantize_blockwise(codes: torch.Tensor, scales: torch.Tensor, block_size: int, signed: bool) -> torch.Tensor:
    """(codes uint8 (n,), scales fp32 (nblocks,)) -> fp32 (n,): map value times its block's scale."""
    values, _ = _map_tensors(signed, codes.device)
    n = codes.numel()
    out = values[codes.long()]
    pad = -n % block_size
    out = torch.nn.functional.pad(out, (0, pad)).view(-1, block_size) * scales.unsqueeze(1)
    return out.view(-1)[:n]


class AdamW8bit(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias-corrected) with block-wise 8-bit moments.

    ``params``: float parameters (fp32, bf16, fp16 or fp64; the update is computed in fp32 and written back in
    the parameter's dtype, rounded to nearest). State per parameter: ``step`` (int), ``exp_avg_codes`` /
    ``exp_avg_sq_codes`` (uint8, one per value), ``exp_avg_scales`` / ``exp_avg_sq_scales`` (fp32, one per
    block). Works per parameter, so ``OptimizerInBackward(params, AdamW8bit, ...)`` takes the same steps.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, *, block_size: int = DEFAULT_BLOCK_SIZE):
        if not lr >= 0:
            raise ConfigError(f"lr={lr!r} must be >= 0")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ConfigError(f"betas={tuple(betas)!r} must each be in [0, 1)")
        if not eps > 0:
            raise ConfigError(f"eps={eps!r} must be > 0")
        if not weight_decay >= 0:
            raise ConfigError(f"weight_decay={weight_decay!r} must be >= 0")
        check_block_size(block_size)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      block_size=block_size))
        for group in self.param_groups:
            check_block_size(group["block_size"])
            for p in group["params"]:
                if not p.is_floating_point():
                    raise ConfigError(f"AdamW8bit steps float parameters; one is {p.dtype} (complex and integer "
                                      "parameters have no 8-bit moment map)")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    def _update(self, p: torch.Tensor, group: dict) -> None:
        if p.grad.is_sparse:
            raise ConfigError("AdamW8bit does not take sparse gradients")
        bs = group["block_size"]
        state = self.state[p]
        n = p.numel()
        if not state:
            nblocks = -(-n // bs)
            for name in ("exp_avg", "exp_avg_sq"):
                state[name + "_codes"] = torch.zeros(n, dtype=torch.uint8, device=p.device)
                state[name + "_scales"] = torch.zeros(nblocks, dtype=torch.float32, device=p.device)
            state["step"] = 0
        state["step"] += 1
        t = state["step"]
        beta1, beta2 = group["betas"]
        lr, wd, eps = float(group["lr"]), group["weight_decay"], group["eps"]
        bc1, bc2_sqrt = 1 - beta1 ** t, math.sqrt(1 - beta2 ** t)
        work = p if p.is_contiguous() else p.contiguous()  # a strided parameter is stepped on a copy
        flat_p, flat_g = work.view(-1), p.grad.reshape(-1)
        # Chunks are whole blocks, so each block's scale is computed from all its values.
        chunk = max(bs, CHUNK_ELEMENTS // bs * bs)
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            b0, b1 = start // bs, -(-stop // bs)
            g = flat_g[start:stop].float()
            m = dequantize_blockwise(state["exp_avg_codes"][start:stop], state["exp_avg_scales"][b0:b1], bs, True)
            v = dequantize_blockwise(state["exp_avg_sq_codes"][start:stop], state["exp_avg_sq_scales"][b0:b1],
                                     bs, False)
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            for name, x, signed in (("exp_avg", m, True), ("exp_avg_sq", v, False)):
                codes, scales = quantize_blockwise(x, bs, signed)
                state[name + "_codes"][start:stop] = codes
                state[name + "_scales"][b0:b1] = scales
            x = flat_p[start:stop].float()
            x.mul_(1 - lr * wd)
            denom = (v.sqrt_() / bc2_sqrt).add_(eps)
            x.addcdiv_(m, denom, value=-lr / bc1)
            flat_p[start:stop] = x.to(p.dtype)
        if work is not p:
            p.copy_(work)

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's loader casts float state to each parameter's dtype; the scales must stay fp32."""
        saved = state_dict["state"]
        super().load_state_dict(state_dict)
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(ids, params):
            if i in saved:
                for name in ("exp_avg_scales", "exp_avg_sq_scales"):
                    self.state[p][name] = saved[i][name].to(device=p.device, dtype=torch.float32).clone()

    def state_bytes(self) -> int:
        """Bytes of optimizer state held now (codes and scales; the step counters are Python ints)."""
        return sum(t.numel() * t.element_size() for s in self.state.values() for t in s.values()
                   if isinstance(t, torch.Tensor))
