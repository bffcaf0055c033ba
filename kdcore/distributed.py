"""One job on several processes of one node: PyTorch's elastic launcher, DDP or FSDP2, gloo on CPUs, NCCL on GPUs.

`distillery distill` (and the worker, through it) re-runs itself under `torch.distributed.run` when
the spec asks for `distributed.nproc > 1`; every rank then joins the group `torchrun` describes in its
environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT). Inside the engine one `Group` carries
what the loop needs of it: which share of each global batch is this rank's, and the few collectives
(sums of the epoch's metrics, "does any rank want to stop", gathering the teacher's logits).

A single-process run gets `Group()`, whose collectives do nothing, so the loop has one code path.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from kdcore.errors import KDError
from kdcore.spec import DistributedSpec

# torchrun sets these in every rank's environment; their presence is how a rank knows it is one.
_RANK_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class Group:
    """This process's place in the job's process group; rank 0 of 1 when the job is not distributed."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    strategy: str = "ddp"  # distributed.strategy: ddp replicates the trained model, fsdp shards it

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def sharded(self) -> bool:
        """FSDP: every forward of a trained model is a collective, so the ranks must run every batch together."""
        return self.active and self.strategy == "fsdp"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, batch_size: int) -> tuple[slice, float]:
        """This rank's rows of a global batch, and the weight that makes DDP's mean of the ranks' mean
        losses the global batch's mean loss (shares differ by one sample when the batch is uneven).

        A rank left without a row (a last batch smaller than the group) still joins the backward pass
        that DDP synchronises, on one row weighted zero.
        """
        if not self.active:
            return slice(None), 1.0
        rows = len(range(self.rank, batch_size, self.world))
        if rows == 0:
            return slice(0, 1), 0.0
        return slice(self.rank, None, self.world), rows * self.world / batch_size

    def owns(self, position: int) -> bool:
        """Round-robin ownership of evaluation batches."""
        return position % self.world == self.rank

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.active:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every rank when it is true on one: a cancel seen by rank 0 stops all of them at the same step."""
        if not self.active:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """What the loop trains: `model` itself alone; under DDP a replica wrapper; under FSDP `model`, sharded
        in place (its parameters become shards, so the optimiser must be built after this)."""
        if not self.active:
            return model
        if self.sharded:
            from kdcore.sharding import shard_model

            return shard_model(model)
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [device.index] if device.type == "cuda" and device.index is not None else None
        return DistributedDataParallel(model, device_ids=device_ids)

    def slice_width(self, total: int) -> int:
        """The most rows any rank's slice of `total` has (`gather_rows`): what a rank in lockstep pads to."""
        return -(-total // self.world)

    def gather_rows(self, compute: Callable[[int, int], torch.Tensor], total: int) -> torch.Tensor:
        """`compute(start, end)` on this rank's contiguous slice of `total` rows, the slices joined on every rank.

        The teacher's logits are computed once, split across the ranks, not once per rank.
        """
        if not self.active:
            return compute(0, total)
        bounds = [total * r // self.world for r in range(self.world + 1)]
        start, end = bounds[self.rank], bounds[self.rank + 1]
        local = compute(start, end)
        width = max(bounds[r + 1] - bounds[r] for r in range(self.world))
        padded = local.new_zeros((width, *local.shape[1:]))
        padded[: len(local)] = local
        pieces = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(pieces, padded)
        return torch.cat([pieces[r][: bounds[r + 1] - bounds[r]] for r in range(self.world)])

    def gather_ragged(self, local: torch.Tensor) -> torch.Tensor:
        """Every rank's `local` (any number of rows, the same trailing shape), joined in rank order on every rank."""
        if not self.active:
            return local
        count = torch.tensor([local.shape[0]], dtype=torch.int64, device=local.device)
        counts = [torch.zeros_like(count) for _ in range(self.world)]
        dist.all_gather(counts, count)
        sizes = [int(size.item()) for size in counts]
        padded = local.new_zeros((max(sizes), *local.shape[1:]))
        padded[: len(local)] = local
        pieces = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(pieces, padded)
        return torch.cat([piece[:size] for piece, size in zip(pieces, sizes, strict=True)])

    def average_gradients(self, model: nn.Module) -> None:
        """What DDP does in backward, in one all-reduce after it: for loops that train through a model's own
        methods (a causal LM's `scored` and `head`), not its forward, which DDP's wrapper needs to see.

        A parameter without a gradient on this rank (a rank without scored tokens) counts as zero.
        """
        if not self.active:
            return
        parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
        grads = [parameter.grad if parameter.grad is not None else torch.zeros_like(parameter)
                 for parameter in parameters]
        flat = torch.cat([grad.reshape(-1) for grad in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= self.world
        offset = 0
        for parameter in parameters:
            size = parameter.numel()
            parameter.grad = flat[offset:offset + size].view_as(parameter).clone()
            offset += size

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


def in_launched_rank() -> bool:
    return all(name in os.environ for name in _RANK_ENV) and int(os.environ["WORLD_SIZE"]) > 1


def join(spec: DistributedSpec, device: torch.device) -> Group:
    """Join the group torchrun started this process in (or stay alone); the backend follows the device."""
    if not in_launched_rank():
        return Group()
    world = int(os.environ["WORLD_SIZE"])
    if world != spec.nproc:
        raise KDError(f"this rank was launched in a group of {world}, the spec asks for {spec.nproc}",
                      field="distributed.nproc", code="bad_input")
    if device.type == "cuda":
        # FSDP (and NCCL) allocate on the current device: each rank's must be its own GPU, not cuda:0.
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        # The timeout turns a rank stuck in a collective (its peer died or hangs) into an error, not a hang.
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=spec.timeout_s),
                                store=_round_store(spec.timeout_s), rank=int(os.environ["RANK"]), world_size=world)
    return Group(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=int(os.environ["LOCAL_RANK"]),
                 strategy=spec.strategy)


def _round_store(timeout_s: float) -> dist.Store:
    """The launcher's store, under a prefix of this restart round.

    After a rank dies the agent starts the group again against the same store; without a prefix a
    new rank may read the dead round's peer addresses (gloo then knocks on a closed port, "Connection
    refused", and every later round fails the same way).
    """
    timeout = timedelta(seconds=timeout_s)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=rank == 0 and not agent_store, timeout=timeout)
    return dist.PrefixStore(f"round-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def leave(group: Group) -> None:
    if group.active and dist.is_initialized():
        dist.destroy_process_group()


def report(group: Group, strategy: str, batch_size: int, device: torch.device) -> dict[str, object]:
    """The report's `distributed`: world size, strategy, backend, global and per-rank batch."""
    return {"world_size": group.world, "strategy": strategy, "global_batch": batch_size,
            "per_rank_batch": batch_size / group.world, "backend": "nccl" if device.type == "cuda" else "gloo"}


def rank_threads(threads: int | None, group: Group, device: torch.device) -> int | None:
    """CPU ranks split the cores between them unless the spec says otherwise: oversubscribed ranks crawl."""
    if threads is not None or not group.active or device.type != "cpu":
        return threads
    from kdcore.runtime import default_threads

    return max(1, default_threads() // group.world)


def rank_device(name: str) -> str:
    """Each rank of a GPU job takes its own GPU (its local rank); CPU ranks share the CPU."""
    if name in ("auto", "cuda") and in_launched_rank() and torch.cuda.is_available():
        return f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return name


def launch_command(spec: DistributedSpec, argv: Sequence[str]) -> list[str]:
    """The elastic launcher's command line that runs `python -m kdcore.cli <argv>` on `nproc` local ranks.

    `--max-restarts`: when a rank dies the agent stops the others and starts the whole group again,
    which resumes from the last checkpoint; `--standalone`: one node, a free local rendezvous port.
    """
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={spec.nproc}",
            f"--max-restarts={spec.max_restarts}", "--monitor-interval=0.5", "-m", "kdcore.cli", *argv]
