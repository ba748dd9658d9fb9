import pytest
import torch

import revnet_core


@pytest.fixture
def tiny_model():
    """A small fp64 model factory: tiny_model(**config) -> (model, ids)."""

    def make(seed=0, batch=2, seq=12, **fields):
        torch.manual_seed(seed)
        cfg = dict(num_layers=3, d_model=16, num_heads=2, d_ff=24, vocab_size=37, max_seq_len=64)
        cfg.update(fields)
        model = revnet_core.build("torch", **cfg).double()
        ids = torch.randint(0, cfg["vocab_size"], (batch, seq))
        return model, ids

    return make


def grads_of(model, ids, policy, **kw):
    """Loss and parameter gradients (plus embedding-input gradient via the embedding weight) under a policy."""
    model.zero_grad(set_to_none=True)
    model.set_policy(policy)
    torch.manual_seed(1234)  # dropout masks start from the same state for every policy
    loss = model(ids, **kw).loss
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: faster for small tensors, and the CPU attention kernel's per-thread buffers
    (not modelled: they scale with threads, not tokens) stay small. Use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# Per-layer plans of 3 layers the cost model's saved bytes are checked on.
PLANS = [["store"] * 3, ["reverse"] * 3, ["checkpoint"] * 3, ["store", "reverse", "checkpoint"],
         ["recompute_attention", "recompute_ffn", "store"], ["reverse", "recompute_ffn", "reverse"]]


def plan_saved_bytes(model, ids, plan, autocast: bool) -> int:
    """Bytes autograd saves in one forward of ``model`` with ``plan`` applied through a LayerScheduler
    (parameters excluded); the backward runs too, so the graph is consumed."""
    from revnet_torch.memory import saved_tensor_bytes
    from revnet_torch.scheduler import LayerScheduler

    ls = LayerScheduler()
    for i, p in enumerate(plan):
        ls.set_policy(layers=[i], policy=p)
    model.set_scheduler(ls)
    model.scheduler.measure = False  # measured here instead (under our hooks it would skip its own anyway)
    with saved_tensor_bytes(exclude=list(model.parameters())) as saved:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(ids).loss
    loss.backward()
    model.set_scheduler(None)
    return saved["bytes"]


def saved_bytes_case(fields: dict, T: int, autocast: bool):
    """A 3-layer CPU model of ``fields`` (batch 2, T tokens), its cost model, and (plan, predicted, measured)
    saved bytes for every plan of PLANS."""
    from revnet_core.memory import Workload
    from revnet_torch.cost import CostModel

    torch.manual_seed(0)
    model = revnet_core.build("torch", num_layers=3, vocab_size=64, loss_chunk_size=16, max_seq_len=256, **fields)
    cfg = model.config  # torch options among the fields land in its section
    ids = torch.randint(0, 64, (2, T))
    cm = CostModel(cfg, Workload(batch=2, seq_len=T, autocast_dtype="bfloat16" if autocast else None, device="cpu"))
    return model, cm, [(plan, cm.saved_bytes(plan), plan_saved_bytes(model, ids, plan, autocast)) for plan in PLANS]


def step_peak(model, ids, autocast: bool, before_measuring=lambda: None):
    """(predicted, measured, cost_model): the peak above the start of a CPU training step, step 2 (AdamW's
    state exists), every allocation recorded by DetailedMemoryProfiler, against the cost model's prediction
    for the model's policies. ``before_measuring`` runs between step 1 and step 2."""
    from revnet_core.memory import Workload
    from revnet_torch.cost import CostModel
    from revnet_torch.profiler import DetailedMemoryProfiler

    opt = torch.optim.AdamW(model.parameters(), fused=True)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # step 1 creates the optimizer state
    before_measuring()
    with DetailedMemoryProfiler() as prof:
        step()
    measured = prof.generate_report().peak("cpu")[1]
    B, T = ids.shape
    cm = CostModel(model.config, Workload(batch=B, seq_len=T, autocast_dtype="bfloat16" if autocast else None,
                                          device="cpu"))
    start = cm.parameter_bytes() + cm.optimizer_bytes() + cm.rope_table_bytes() + ids.numel() * 8
    return cm.peak_bytes(model.policies) - start, measured, cm


def stack_grads(seq, x, policy):
    """Gradients of a random projection of a ReversibleSequence's two outputs under ``policy``, the input's
    under "x": the quantity the layers' fp64 gradient checks compare between policies."""
    seq.zero_grad(set_to_none=True)
    seq.policies = [policy] * len(seq.layers)
    xg = x.clone().requires_grad_(True)
    torch.manual_seed(11)
    y1, y2 = seq(xg)
    g = torch.Generator().manual_seed(12)
    ((y1 * torch.randn(y1.shape, generator=g, dtype=y1.dtype)).sum()
     + (y2 * torch.randn(y2.shape, generator=g, dtype=y2.dtype)).sum()).backward()
    return {"x": xg.grad, **{n: p.grad.clone() for n, p in seq.named_parameters()}}
