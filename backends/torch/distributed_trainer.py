"""DistributedReversibleTrainer: ``LongContextTrainer`` over several processes, through DDP or FSDP2.

One process per device (``torchrun --nproc-per-node N script.py``, or a group the caller initialised; with
neither, a group of one). Every rank draws the same global batch from the shared seeded sampler and trains
on its own rows, so N ranks with ``batch_size=B`` compute what one process computes with ``B * N``: the
loss is the token mean over the global batch and the gradients are its gradients (DDP and FSDP2 average
over ranks; the step's token count is summed over ranks before the scaling). Checkpoints hold the full model
and optimizer states, gathered through ``torch.distributed.checkpoint.state_dict`` and written by rank 0, so
a run resumes on any number of ranks (one included) with either strategy.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch
import torch.distributed as dist

from revnet_core import policies
from revnet_core.errors import ConfigError

from .distributed import check_gradients, check_unwrapped, shard_model
from . import checkpoint as ckpt
from .trainer import LongContextTrainer

STRATEGIES = ("ddp", "fsdp")
# jax.checkpoint_policies' names (the user's README passes one): nothing saved is the table's least-memory
# policy (the last: the table runs most memory first), everything saved its first.
SAVEABLE = {"nothing_saveable": policies.NAMES[-1], "everything_saveable": policies.NAMES[0]}


def resolve_policy(name: str | None) -> str | None:
    """``gradient_checkpointing_policy`` as a policy of ``revnet_core.policies``: a policy name, a JAX
    scheduler name (``REMATERIALIZATION``) or a ``jax.checkpoint_policies`` name (``SAVEABLE``); None keeps
    the model's policies. Anything else is a ConfigError listing what is accepted."""
    if name is None:
        return None
    for table in (policies.BY_NAME, policies.REMATERIALIZATION, SAVEABLE):
        if name in table:
            return name if table is policies.BY_NAME else table[name]
    accepted = [*policies.NAMES, *policies.REMATERIALIZATION, *SAVEABLE]
    raise ConfigError(f"gradient_checkpointing_policy={name!r} is not one of {accepted}")


def default_device() -> torch.device:
    """This rank's device: the GPU of its local rank (``LOCAL_RANK``, set by torchrun), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def ensure_process_group(device: torch.device) -> bool:
    """Use the initialised process group, else initialise one: from torchrun's environment, else a group of
    one process (gloo, in-memory store). Returns whether this call created it."""
    if dist.is_initialized():
        return False
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    else:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    return True


class DistributedReversibleTrainer(LongContextTrainer):
    """``LongContextTrainer`` with data parallelism: ``sharding_strategy`` "ddp" (``DistributedDataParallel``
    over the model, every rank holding all of it) or "fsdp" (FSDP2, one unit per reversible layer and one for
    the root: ``revnet_torch.distributed.shard_model``). ``cpu_offload=True`` (fsdp only): FSDP2's
    ``CPUOffloadPolicy``, parameters, gradients and optimizer state on the host. ``mp_policy``: an FSDP2
    ``MixedPrecisionPolicy``. ``gradient_checkpointing_policy``: every layer's policy (see
    ``resolve_policy``: ``"nothing_saveable"`` is ``reverse``); None keeps the model's. Every other keyword
    is ``LongContextTrainer``'s; ``batch_size`` counts each rank's rows. Not with ``optimizer_in_backward``
    or fp16 (the loss scaler would need the sharded scaler); the drift fallback is off by default, since
    each rank would switch its own layers.
    """

    def __init__(self, model: torch.nn.Module, sharding_strategy: str = "fsdp", cpu_offload: bool = False,
                 gradient_checkpointing_policy: str | None = None, mp_policy=None, **kwargs: Any):
        if sharding_strategy not in STRATEGIES:
            raise ConfigError(f"sharding_strategy={sharding_strategy!r} is not one of {list(STRATEGIES)}")
        if cpu_offload and sharding_strategy != "fsdp":
            raise ConfigError("cpu_offload=True needs sharding_strategy='fsdp' (DDP keeps every parameter on "
                              "the device)")
        if mp_policy is not None and sharding_strategy != "fsdp":
            raise ConfigError("mp_policy is FSDP2's MixedPrecisionPolicy: it needs sharding_strategy='fsdp'")
        if kwargs.get("optimizer_in_backward"):
            raise ConfigError("optimizer_in_backward=True is not supported by DistributedReversibleTrainer: "
                              "the update must wait for the gradients' reduction across ranks")
        if kwargs.get("precision") == "fp16":
            raise ConfigError("precision='fp16' is not supported by DistributedReversibleTrainer (its loss "
                              "scaler is not the sharded one); use bf16")
        policy = resolve_policy(gradient_checkpointing_policy)
        device = kwargs.pop("device", None)
        device = default_device() if device is None or str(device) == "auto" else torch.device(device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        check_unwrapped(model)
        self.owns_process_group = ensure_process_group(device)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        if self.rank != 0:  # every rank runs the same steps, saves included; rank 0 alone writes and shows
            kwargs.update(progress=False, plot=False)
        kwargs.setdefault("drift_every", None)
        self.bare_class = type(model).__name__
        self.sharding_strategy = sharding_strategy
        self.cpu_offload = bool(cpu_offload)
        if policy is not None:
            model.set_policy(policy)
        super().__init__(model, device=device, **kwargs)  # moves the model to the device
        self.log_memory_usage = True
        self._slicing = False
        self.ddp = None
        if sharding_strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            self.ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        else:
            from torch.distributed.fsdp import CPUOffloadPolicy

            offload = CPUOffloadPolicy(pin_memory=device.type == "cuda") if cpu_offload else None
            shard_model(model, mp_policy=mp_policy, offload_policy=offload)

    # --- public API ------------------------------------------------------------------------------------
    def train(self, train_dataloader: Any = None, num_epochs: int = 1, log_memory_usage: bool = True,
              **kwargs: Any) -> dict[str, Any]:
        """The README's ``train(train_dataloader=..., num_epochs=..., log_memory_usage=True)``: a DataLoader
        (its dataset, its batch size per rank) or a dataset as ``LongContextTrainer.train`` takes;
        ``log_memory_usage``: each step's record also gets ``mem_bytes_max_rank``, the largest over ranks."""
        dataset = getattr(train_dataloader, "dataset", train_dataloader)
        if dataset is None:
            dataset = kwargs.pop("train_dataset")
        batch = kwargs.pop("batch_size", None) or getattr(train_dataloader, "batch_size", None) or 1
        self.log_memory_usage = bool(log_memory_usage)
        return super().train(dataset, num_epochs=num_epochs, batch_size=batch * self.world_size, **kwargs)

    def hyperparameters(self) -> dict[str, Any]:
        return {**super().hyperparameters(), "sharding_strategy": self.sharding_strategy,
                "cpu_offload": self.cpu_offload}

    @property
    def model_class_name(self) -> str:
        return self.bare_class  # FSDP2 renames the class (FSDPReversibleTransformer); checkpoints must not

    def save(self, data, run_settings=None):
        """Every rank gathers the full states (a collective); rank 0 writes ``out_dir/checkpoint.pt``. Returns
        its path on every rank."""
        if self.out_dir is None:
            raise ConfigError("no out_dir: the trainer has nowhere to write a checkpoint")
        states = self._training_states()
        if self.rank != 0:
            return self.out_dir / ckpt.FILENAME
        self._gathered = states
        try:
            return super().save(data, run_settings)
        finally:
            self._gathered = None

    @contextlib.contextmanager
    def _rank0_writes(self):
        """Hide ``out_dir`` from the base class's writers on every rank but 0 (their log, result file)."""
        out = self.out_dir
        if self.rank != 0:
            self.out_dir = None
        try:
            yield
        finally:
            self.out_dir = out

    # --- LongContextTrainer's hooks --------------------------------------------------------------------
    def _training_states(self) -> dict[str, Any]:
        gathered = getattr(self, "_gathered", None)
        if gathered is not None:
            return gathered
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state, optimizer_state = get_state_dict(self.model, self.optimizer, options=options)
        return {"model": model_state, "optimizer": optimizer_state}

    def _load_training_states(self, model_state: dict[str, Any], optimizer_state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(self.model, self.optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state,
                       options=StateDictOptions(full_state_dict=True))

    def _open_log(self, data, steps: int, start: int) -> None:
        with self._rank0_writes():
            super()._open_log(data, steps, start)

    def _summary(self, *args, **kwargs) -> dict[str, Any]:
        with self._rank0_writes():
            return super()._summary(*args, **kwargs)

    def _train_step(self, data, step: int) -> dict[str, Any]:
        self._slicing = True  # training batches are global: each rank takes its rows (evaluation: all)
        try:
            return super()._train_step(data, step)
        finally:
            self._slicing = False

    def _to_device(self, ids, labels):
        if self._slicing:
            if ids.shape[0] % self.world_size:
                raise ConfigError(f"a global batch of {ids.shape[0]} rows does not split over "
                                  f"{self.world_size} ranks; use a batch size divisible by the world size")
            per = ids.shape[0] // self.world_size
            rows = slice(self.rank * per, (self.rank + 1) * per)
            ids, labels = ids[rows], None if labels is None else labels[rows]
        return super()._to_device(ids, labels)

    def _micro_forward(self, ids, labels, last: bool) -> torch.Tensor:
        # Gradients are reduced on the last micro-batch of a step only; the others accumulate locally.
        if self.ddp is not None:
            with contextlib.nullcontext() if last else self.ddp.no_sync():  # DDP decides at the forward
                return self.ddp(ids, labels=labels).loss
        self.model.set_requires_gradient_sync(last)
        return self.model(ids, labels=labels).loss

    def _step_totals(self, total_nats: torch.Tensor, targets: int, step: int):
        check_gradients(self.model, step)
        totals = torch.stack([total_nats.double(), total_nats.new_tensor(float(targets), dtype=torch.float64)])
        dist.all_reduce(totals)
        # DDP and FSDP2 average the ranks' gradients, so the per-rank mean of the totals makes the scaling
        # 1 / (the global token count) of the summed gradients.
        return totals[0] / self.world_size, float(totals[1]) / self.world_size

    def _emit_step(self, record: dict[str, Any]) -> dict[str, Any]:
        record["world_size"] = self.world_size
        if isinstance(record.get("grad_norm"), torch.Tensor):
            record["grad_norm"] = float(record["grad_norm"])
        if self.log_memory_usage:
            peak = torch.tensor([float(record["mem_bytes"])], dtype=torch.float64, device=self.device)
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
            record["mem_bytes_max_rank"] = int(peak)
        return super()._emit_step(record)
