"""Best-epoch selection (`stages.select: best_val`): the weights that ship are the best validated ones.

The trainer offers every epoch's validation figures; the best so far is kept in `RunState.info`, so it
travels with the checkpoint and a resumed run chooses exactly as an uninterrupted one. After the last
stage the pipeline puts the chosen weights back into the models before they are evaluated and exported.
The test split never takes part: choosing on it would flatter the figures the report shows.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

#: The models whose weights are chosen; the teacher is what the user handed in (or adapted) and stays as trained.
SELECTED_MODELS = ("student", "baseline")
_BEST = "best_epochs"


def _better(metrics: Mapping[str, Any], best: Mapping[str, Any] | None) -> bool:
    if best is None:
        return True
    if metrics["val_accuracy"] != best["val_accuracy"]:
        return bool(metrics["val_accuracy"] > best["val_accuracy"])
    return bool(metrics.get("val_loss", 0.0) < best.get("val_loss", 0.0))  # a tie goes to the surer model


def remember_if_best(info: dict[str, Any], model_key: str, stage: str, epoch: int, model: nn.Module,
                     metrics: Mapping[str, Any]) -> None:
    """Keep a copy of `model`'s weights when this epoch validates better than every earlier one."""
    if model_key not in SELECTED_MODELS or "val_accuracy" not in metrics:
        return
    best = info.setdefault(_BEST, {})
    if _better(metrics, best.get(model_key)):
        best[model_key] = {
            "stage": stage, "epoch": epoch, "val_accuracy": float(metrics["val_accuracy"]),
            "val_loss": float(metrics.get("val_loss", 0.0)),
            "weights": {name: tensor.detach().cpu().clone() for name, tensor in model.state_dict().items()},
        }


def restore_best(info: Mapping[str, Any], models: Mapping[str, nn.Module]) -> dict[str, dict[str, Any]]:
    """Load each selected model's best weights; return which epoch each came from (for metrics and report)."""
    chosen: dict[str, dict[str, Any]] = {}
    for key, best in (info.get(_BEST) or {}).items():
        if key not in models:
            continue
        device = next((p.device for p in models[key].parameters()), torch.device("cpu"))
        models[key].load_state_dict({name: tensor.to(device) for name, tensor in best["weights"].items()})
        chosen[key] = {"stage": best["stage"], "epoch": best["epoch"], "val_accuracy": best["val_accuracy"]}
    return chosen
