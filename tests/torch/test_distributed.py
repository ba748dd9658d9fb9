"""Reversible layers over two processes (gloo, fp64): DDP, FSDP2 per layer and FSDP2 with CPU offload give one
process's loss and gradients for reverse, store and mixed plans; DistributedReversibleTrainer's steps equal
LongContextTrainer's over the same global batch, and its checkpoint resumes onto one rank; a sharding that
would leave layers without gradients raises DistributedError.

One ``mp.spawn`` of two ranks runs every distributed check (a spawn costs seconds); the ranks put their
results in a Manager dict and the tests compare them with references computed here, in one process.
"""

import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import revnet_core
from revnet_core.data import dataset_data
from revnet_core.errors import ConfigError, DistributedError

CFG = dict(num_layers=2, d_model=32, num_heads=2, d_ff=48, vocab_size=37, max_seq_len=64)
PLANS = {"reverse": ["reverse"] * 2, "store": ["store"] * 2, "mixed": ["checkpoint", "reverse"]}
MODES = ("ddp", "fsdp", "fsdp_offload")
WORLD = 2
TRAIN = dict(max_length=16, gradient_accumulation_steps=2, lr=1e-2, warmup_steps=1, precision="fp32",
             progress=False, plot=False, device="cpu", seed=3)
STEPS, STOP_AT = 3, 2
BF16_PLAN = ["reverse", "checkpoint"]


def build(plan=None, dtype=torch.float64):
    torch.manual_seed(0)
    model = revnet_core.build("torch", **CFG).to(dtype)
    if plan is not None:
        model.set_policy(plan)
    return model


def batch():
    return torch.randint(0, CFG["vocab_size"], (WORLD, 12), generator=torch.Generator().manual_seed(5))


def texts():
    rng = np.random.default_rng(0)
    return [torch.from_numpy(rng.integers(0, CFG["vocab_size"], size=16)) for _ in range(8)]


def data(batch_size):
    """The training data at a global batch of ``batch_size`` rows (each rank trains on its share)."""
    return dataset_data(texts(), None, 16, CFG["vocab_size"], batch_size, seed=3)


def full(t):
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def wrap(model, mode):
    from torch.distributed.fsdp import CPUOffloadPolicy
    from revnet_torch.distributed import shard_model

    if mode == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)
    return shard_model(model, offload_policy=CPUOffloadPolicy(pin_memory=False) if mode == "fsdp_offload" else None)


def _gradient_checks(rank, out):
    """Each (mode, plan): two steps of forward and backward on this rank's row; rank 0 records the world's
    mean loss and the full gradients of the second (the first checks that FSDP2's state resets)."""
    from revnet_torch.engine import exact_streams

    ids = batch()[rank:rank + 1]
    cases = [(mode, name, False) for mode in MODES for name in PLANS]
    cases.append(("fsdp", "exact", True))  # fixed-point streams: store and checkpoint through the layer hook
    cases.append(("fsdp", "bf16", "auto"))  # fp32 weights, bf16 autocast: fixed point by itself
    for mode, name, exact in cases:
        model = build(PLANS.get(name, BF16_PLAN if name == "bf16" else ["store", "checkpoint"]),
                      torch.float32 if name == "bf16" else torch.float64)
        wrapped = wrap(model, mode)
        with exact_streams(exact):
            for _ in range(2):
                model.zero_grad(set_to_none=True)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=name == "bf16"):
                    loss = wrapped(ids).loss
                loss.backward()  # outside autocast, as training loops do
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        grads = {n: full(p.grad) for n, p in model.named_parameters()}
        if rank == 0:
            out[("grads", mode, name)] = (float(mean) / WORLD, grads)


def _guard_checks(rank, out):
    """Hand-made FSDP2 sharding that hides the reversible nodes: per layer without the hook, per block."""
    from torch.distributed.fsdp import fully_shard
    from revnet_torch.distributed import shard_model

    ids = batch()[rank:rank + 1]
    for name, units in (("layer", lambda m: list(m.layers)),
                        ("block", lambda m: [b for layer in m.layers for b in (layer.attn.block, layer.ffn.block)])):
        model = build()
        for unit in units(model):
            fully_shard(unit)
        fully_shard(model)
        try:
            model(ids).loss.backward()
            out[("guard", name, rank)] = "trained"
        except DistributedError as exc:
            out[("guard", name, rank)] = str(exc)
    try:
        shard_model(model)  # already sharded
        out[("guard", "twice", rank)] = "sharded twice"
    except DistributedError as exc:
        out[("guard", "twice", rank)] = str(exc)


def _trainer_checks(rank, out, folder):
    """DistributedReversibleTrainer, batch 1 per rank, two micro-batches a step: the history and the final
    weights for each strategy; fsdp + offload is stopped after STOP_AT steps and saved."""
    from revnet_torch.distributed_trainer import DistributedReversibleTrainer

    for strategy, offload in (("ddp", False), ("fsdp", False), ("fsdp", True)):
        model = build(PLANS["mixed"])
        key = f"{strategy}{'_offload' if offload else ''}"
        extra = {}
        if offload:  # the interrupted run: a checkpoint at STOP_AT, resumed on one rank below
            extra = dict(out_dir=os.path.join(folder, key),
                         callbacks=[lambda tr, rec: tr.request_stop() if rec["step"] == STOP_AT else None])
        trainer = DistributedReversibleTrainer(model, sharding_strategy=strategy, cpu_offload=offload,
                                               **TRAIN, **extra)
        trainer.fit(data(WORLD), steps=STEPS)
        weights = {n: full(p) for n, p in model.named_parameters()}
        if rank == 0:
            out[("trainer", key)] = ([(r["loss"], r["grad_norm"], r["mem_bytes_max_rank"]) for r in trainer.history
                                      if r["kind"] == "train"], weights)


def _resume_on_one_rank(out, folder):
    """After the two-rank group is gone: a group of one (the trainer makes it) resumes the fsdp checkpoint."""
    from revnet_torch.distributed_trainer import DistributedReversibleTrainer

    model = build(PLANS["mixed"])
    trainer = DistributedReversibleTrainer(model, sharding_strategy="fsdp", **TRAIN)
    assert trainer.owns_process_group and trainer.world_size == 1
    summary = trainer.fit(data(WORLD), steps=STEPS, resume=os.path.join(folder, "fsdp_offload"))
    out["resumed"] = (summary["resumed_from"], [r["loss"] for r in trainer.history if r["kind"] == "train"],
                      {n: full(p) for n, p in model.named_parameters()})
    dist.destroy_process_group()


def _worker(rank, store_file, folder, out):
    # a file rendezvous: a free TCP port picked by the parent can be taken before the workers bind it
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=WORLD)
    try:
        _gradient_checks(rank, out)
        _guard_checks(rank, out)
        _trainer_checks(rank, out, folder)
        dist.barrier()
    except Exception as exc:  # reported by the test rather than lost in a dead process
        out[("error", rank)] = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        dist.destroy_process_group()
    if rank == 0:
        try:
            _resume_on_one_rank(out, folder)
        except Exception as exc:
            out[("error", "resume")] = f"{type(exc).__name__}: {exc}"
    # Leave without running interpreter and static destructors: C++ teardown after gloo sometimes aborts
    # (tests/torch/test_model.py's DDP test saw it).
    os._exit(0)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Everything the two ranks recorded (one spawn for the whole module)."""
    folder = tmp_path_factory.mktemp("distributed")
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(str(folder / "rendezvous"), str(folder), out), nprocs=WORLD, join=True)
    results = dict(out)
    errors = {k: v for k, v in results.items() if k[0] == "error"}
    assert not errors, errors
    return results


def reference(plan, exact=False, dtype=torch.float64):
    """One process, both rows: the mean of the two rows' losses and its gradients (what the ranks average).
    One backward per row, as on the ranks: in one graph autocast's cached bf16 weight copy would sum the
    rows' weight gradients in bf16 first (6e-5 off at fp32 here)."""
    from revnet_torch.engine import exact_streams

    model, ids = build(plan, dtype), batch()
    losses = []
    with exact_streams(exact):
        for row in (ids[:1], ids[1:]):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.float32):
                loss = 0.5 * model(row).loss
            loss.backward()
            losses.append(float(loss))
    return sum(losses), {n: p.grad for n, p in model.named_parameters()}


def assert_same(got, want):
    assert set(got) == set(want)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-10, atol=1e-12, msg=n)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("plan", list(PLANS))
def test_gradients_equal_one_process(ranks, mode, plan):
    loss, grads = ranks[("grads", mode, plan)]
    ref_loss, ref_grads = reference(PLANS[plan])
    assert loss == pytest.approx(ref_loss, rel=1e-12)
    assert_same(grads, ref_grads)


def test_exact_streams_store_and_checkpoint_under_fsdp(ranks):
    """Fixed-point streams run store and checkpoint layers through the engine's layer hook (not the
    layer's forward): FSDP2 must still gather them."""
    loss, grads = ranks[("grads", "fsdp", "exact")]
    ref_loss, ref_grads = reference(["store", "checkpoint"], exact=True)
    assert loss == pytest.approx(ref_loss, rel=1e-12)
    assert_same(grads, ref_grads)


def test_bf16_autocast_under_fsdp(ranks):
    """fp32 weights under bf16 autocast (the streams in fixed point, so reverse rebuilds bit for bit): the
    issue's fp32 tolerance, 1e-5; only the order of the ranks' fp32 gradient sums differs."""
    loss, grads = ranks[("grads", "fsdp", "bf16")]
    ref_loss, ref_grads = reference(BF16_PLAN, exact="auto", dtype=torch.float32)
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    assert set(grads) == set(ref_grads)
    for n in ref_grads:
        gap = float((grads[n] - ref_grads[n]).abs().max())
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-5, atol=1e-6, msg=f"{n}: off by {gap:.3g}")


@pytest.mark.parametrize("how", ["layer", "block"])
def test_hand_sharding_that_hides_the_nodes_raises(ranks, how):
    """Before: per layer a raw DTensor RuntimeError; per block every layer gradient silently None."""
    for rank in range(WORLD):
        message = ranks[("guard", how, rank)]
        assert "sharded (DTensor) where its reversible node runs" in message and "shard_model" in message


def test_sharding_twice_raises(ranks):
    assert "already sharded with fully_shard" in ranks[("guard", "twice", 0)]


def single_process_run(steps=STEPS):
    from revnet_torch.trainer import LongContextTrainer

    model = build(PLANS["mixed"])
    trainer = LongContextTrainer(model, drift_every=None, **TRAIN)
    trainer.fit(data(WORLD), steps=steps)
    return [r for r in trainer.history if r["kind"] == "train"], {n: p.detach() for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def uninterrupted():
    return single_process_run()


@pytest.mark.parametrize("key", ["ddp", "fsdp"])
def test_trainer_steps_equal_one_process(ranks, uninterrupted, key):
    """Two ranks of batch 1, two micro-batches a step (no_sync / set_requires_gradient_sync on the first),
    clipping and AdamW: the same losses, gradient norms and weights as one process with batch 2."""
    records, weights = ranks[("trainer", key)]
    ref_records, ref_weights = uninterrupted
    assert len(records) == STEPS
    for (loss, norm, mem), ref in zip(records, ref_records):
        assert loss == pytest.approx(ref["loss"], rel=1e-10)
        assert norm == pytest.approx(ref["grad_norm"], rel=1e-10)
        assert mem > 0
    assert_same(weights, ref_weights)


def test_checkpoint_resumes_on_one_rank(ranks, uninterrupted):
    """fsdp + CPU offload on two ranks stopped at step 2, resumed by a group of one: the uninterrupted
    one-process run's losses and weights."""
    stopped, _ = ranks[("trainer", "fsdp_offload")]
    resumed_from, losses, weights = ranks["resumed"]
    ref_records, ref_weights = uninterrupted
    assert len(stopped) == STOP_AT and resumed_from == STOP_AT
    assert [loss for loss, _, _ in stopped] + losses == pytest.approx([r["loss"] for r in ref_records], rel=1e-10)
    assert_same(weights, ref_weights)


# --- no process group needed ------------------------------------------------------------------------------
def test_check_gradients_names_what_a_backward_missed():
    from revnet_torch.distributed import check_gradients

    model = build()
    model(batch()).loss.backward()
    check_gradients(model, 1)
    model.layers[1].ffn.block.up.weight.grad = None
    with pytest.raises(DistributedError, match=r"step 1: .* 1 trainable parameters .*layers\.1\.ffn\.block\.up"):
        check_gradients(model, 1)


def test_gradient_checkpointing_policy_names():
    from revnet_torch.distributed_trainer import resolve_policy

    assert resolve_policy("nothing_saveable") == "reverse"
    assert resolve_policy("everything_saveable") == "store"
    assert resolve_policy("full") == "checkpoint" and resolve_policy("store") == "store"
    assert resolve_policy(None) is None
    with pytest.raises(ConfigError, match="gradient_checkpointing_policy='dots_saveable' is not one of"):
        resolve_policy("dots_saveable")


@pytest.mark.parametrize("kwargs,match", [
    (dict(sharding_strategy="zero3"), "sharding_strategy='zero3' is not one of"),
    (dict(sharding_strategy="ddp", cpu_offload=True), "cpu_offload=True needs sharding_strategy='fsdp'"),
    (dict(optimizer_in_backward=True), "optimizer_in_backward=True is not supported"),
    (dict(gradient_checkpointing_policy="dots"), "gradient_checkpointing_policy='dots'"),
])
def test_trainer_refuses_by_name(kwargs, match):
    from revnet_torch.distributed_trainer import DistributedReversibleTrainer

    with pytest.raises(ConfigError, match=match):
        DistributedReversibleTrainer(build(), **kwargs)
    assert not dist.is_initialized()  # refused before any process group was made
