"""`distributed.strategy: fsdp`: PyTorch's FSDP2 (`fully_shard`) for hf models, with DCP checkpoints.

Each rank holds 1/N of a sharded model's parameters (and of its gradients and optimiser state); a
transformer layer's weights are all-gathered just before it runs and freed after, so the largest
model that trains is about N times the one DDP trains. The student is sharded layer by layer, then
at the root (embeddings, head, a kd_hidden projection); so is any model a stage trains, and a
frozen teacher too large to replicate (`teacher_should_shard`).

Checkpoints of sharded models go through `torch.distributed.checkpoint` (DCP): every rank writes its
own shards into one folder per epoch, in parallel, and nobody gathers the whole model for it. A DCP
folder is resharded when it is read, so it resumes on any number of processes, one included: a
plain model reads it the same way (`load_sharded`).

A sharded module can only run when every rank runs it: every forward is a collective. The callers
keep the ranks in step (training steps, validation batches, teacher-cache batches).
"""

from __future__ import annotations

import copy
import shutil
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

T = TypeVar("T")

SHARDED_DIR = "sharded"  # under the job's checkpoint folder: one DCP folder per checkpointed epoch
INFO_KEY = "sharded"  # RunState.info: which DCP folder holds which models' weights (and whose optimiser)

# The plain (unsharded) twin of each sharded model, on the meta device: what rank 0 fills with the
# gathered weights after training, to evaluate and export without any collective.
_SKELETONS: weakref.WeakKeyDictionary[nn.Module, nn.Module] = weakref.WeakKeyDictionary()


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def layer_stack(model: nn.Module) -> nn.ModuleList | None:
    """The transformer layers: the longest ModuleList, which is the stack in every encoder family."""
    best: nn.ModuleList | None = None
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) and (best is None or len(module) > len(best)):
            best = module
    return best


def shard_model(model: nn.Module) -> nn.Module:
    """FSDP2 in place: every transformer layer its own unit (gathered one at a time), then the root.

    Idempotent: a model sharded by an earlier stage (distill, then finetune) stays as it is.
    """
    from torch.distributed.fsdp import fully_shard

    if is_sharded(model):
        return model
    _SKELETONS[model] = _meta_twin(model)
    for layer in layer_stack(model) or []:
        fully_shard(layer)
    fully_shard(model)
    return model


def run_in_root(model: nn.Module, step: Callable[[], T]) -> T:
    """`step()` inside a sharded model's root forward (`model(step=step)`), or just `step()` for a plain one.

    For loops that call a model's inner modules rather than its forward (a causal LM's body, then its
    head in chunks, again in backward through activation checkpointing): the root's pre-forward hook
    all-gathers the root unit (embeddings, final norm, head: tied weights live in it once), which
    FSDP2 keeps unsharded after the root's forward until its backward has reduced their gradients,
    so every head call of the step, forward or recomputed, sees whole weights. The decoder layers
    are units of their own, gathered and freed by their own hooks as the body calls them.
    """
    if not is_sharded(model):
        return step()
    result: T = model(step=step)
    return result


def _meta_twin(model: nn.Module) -> nn.Module:
    """A deep copy whose parameters are on the meta device: the structure, no memory for weights.

    Buffers are copied for real: some (BERT's position ids) are not in the state dict and must survive.
    """
    memo: dict[int, Any] = {}
    for parameter in model.parameters():
        memo[id(parameter)] = nn.Parameter(torch.empty_like(parameter, device="meta"),
                                           requires_grad=parameter.requires_grad)
    return copy.deepcopy(model, memo)


def full_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights on rank 0's CPU (empty on the other ranks); a collective for a sharded model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not is_sharded(model):
        return {name: tensor.detach().cpu().clone() for name, tensor in model.state_dict().items()}
    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {name: tensor for name, tensor in weights.items() if isinstance(tensor, torch.Tensor)}


def unshard(model: nn.Module, device: torch.device, *, is_main: bool) -> nn.Module | None:
    """A plain copy of a sharded model on rank 0 (None elsewhere), for evaluation and export.

    A collective: every rank must call it, in the same order for the same models.
    """
    weights = full_weights(model)
    if not is_main:
        return None
    plain = _SKELETONS.pop(model)
    # assign: the meta parameters become the gathered tensors, no second copy is allocated.
    plain.load_state_dict(weights, assign=True)
    return plain.to(device)


class Weights(nn.Module):
    """Weights already gathered, behind the one method `remember_if_best` reads of a model."""

    def __init__(self, weights: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.weights = weights

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]
        return self.weights


def teacher_bytes_bf16(model: nn.Module) -> int:
    """What the teacher's weights take in bf16: the rule's measure, whatever precision the job runs in."""
    return 2 * sum(parameter.numel() for parameter in model.parameters())


def teacher_should_shard(model: nn.Module, replicate_teacher_mb: float) -> bool:
    """The rule: a frozen teacher is replicated (no all-gather per forward) unless its bf16 weights exceed
    `distributed.replicate_teacher_mb`, where sharding it is what lets the job fit at all."""
    return teacher_bytes_bf16(model) > replicate_teacher_mb * 1024 * 1024


# --- DCP checkpoints ---------------------------------------------------------------------------------------------


@contextmanager
def _quiet_dcp() -> Iterator[None]:
    # Reading a DCP folder without a process group (a resume on one process) is meant, not a mistake.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        warnings.filterwarnings("ignore", message=".*assuming the intent is to.*")
        yield


def save_sharded(checkpoints: Path, name: str, models: Mapping[str, nn.Module], optimizer_of: str,
                 optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Every rank writes its shards of `models` and of the optimiser of `optimizer_of` into one new DCP folder.

    Returns what `RunState.info[INFO_KEY]` records; the folder is complete when this returns on rank 0
    (DCP writes its metadata last, after every rank's shards), so rank 0 may then point the checkpoint at it.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state: dict[str, Any] = {f"model.{key}": get_model_state_dict(model) for key, model in models.items()}
    state["optimizer"] = get_optimizer_state_dict(models[optimizer_of], optimizer)
    folder = checkpoints / SHARDED_DIR / name
    with _quiet_dcp():
        dcp.save(state, checkpoint_id=str(folder))
    return {"dir": f"{SHARDED_DIR}/{name}", "models": sorted(models), "optimizer": optimizer_of}


def has_sharded(info: Mapping[str, Any], key: str) -> bool:
    return key in (info.get(INFO_KEY) or {}).get("models", [])


def restore_shards(keys: Sequence[str], models: Mapping[str, nn.Module], *, checkpoints: Path | None,
                   info: Mapping[str, Any], sharded: bool, sharded_models: dict[str, nn.Module],
                   plain_weights: dict[str, dict[str, torch.Tensor]]) -> None:
    """Models whose weights a DCP checkpoint holds (an fsdp run's): read them, resharded for this group.

    Under fsdp (`sharded`) they are sharded first and go into `sharded_models`, which the trainer
    checkpoints from now on; on a plain group (one process, or ddp) their weights also go into
    `plain_weights` (the run state's models), so the next plain checkpoint is whole.
    """
    for key in keys:
        if checkpoints is None or not has_sharded(info, key):
            continue
        if sharded:
            sharded_models[key] = shard_model(models[key])
        load_sharded(checkpoints, info, key, models[key])
        if not sharded:
            plain_weights[key] = full_weights(models[key])


def load_sharded(checkpoints: Path, info: Mapping[str, Any], key: str, model: nn.Module,
                 optimizer: torch.optim.Optimizer | None = None) -> None:
    """Read `key`'s weights (and, given `optimizer`, its optimiser state) from the checkpoint's DCP folder.

    `model` may be sharded over any number of ranks or plain on one process: DCP reshards as it reads.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    record = info[INFO_KEY]
    state: dict[str, Any] = {f"model.{key}": get_model_state_dict(model)}
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer)
    with _quiet_dcp():
        dcp.load(state, checkpoint_id=str(checkpoints / record["dir"]))
    set_model_state_dict(model, state[f"model.{key}"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optimizer"])


def load_full_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """A plain `optimizer.state_dict()` (every rank has read the whole of it) into the optimiser of a sharded model.

    The plain one numbers the parameters in the order `build_optimizer` took them; FSDP keeps their
    names, so the numbers become names and each rank keeps its shard of every state tensor.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    named: dict[str, Any] = {"state": {names[index]: value for index, value in saved["state"].items()},
             "param_groups": [{**group, "params": [names[index] for index in group["params"]]}
                              for group in saved["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, named, options=StateDictOptions(full_state_dict=True))


def remove_stale(checkpoints: Path, keep: str | None) -> None:
    """Rank 0, once the checkpoint points at the new folder: the older folders are never read again."""
    root = checkpoints / SHARDED_DIR
    if not root.is_dir():
        return
    for folder in root.iterdir():
        if f"{SHARDED_DIR}/{folder.name}" != keep:
            shutil.rmtree(folder, ignore_errors=True)
