"""The teacher check: score the teacher on held-out data before any training, and explain a bad score.

A teacher fed inputs unlike those it was trained on (another normalisation, BGR for RGB) or graded
against labels in another order still runs, and the job would distil its noise. Near chance, the
check re-scores the teacher under what it can test cheaply and says what each gives: the data's own
per-channel mean and std, no normalisation, ImageNet's statistics (three channels), the colour
channels reversed, and the label mapping that best fits the confusion matrix.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from kdcore.data import Preprocess
from kdcore.errors import KDError
from kdcore.evaluate import confusion_matrix
from kdcore.inference import predict_logits
from kdcore.runtime import Runtime

#: Samples the teacher is scored on: enough to tell 30% from 90%, few enough to cost a second.
CHECK_SAMPLES = 1000
#: Samples the data's own mean and std are measured on.
STATS_SAMPLES = 10_000
#: "Near chance": less than this share of the way from chance to perfect.
NEAR_CHANCE = 0.25
IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


def near_chance_threshold(chance: float) -> float:
    return chance + NEAR_CHANCE * (1.0 - chance)


def check_teacher_accuracy(
    teacher: nn.Module, *, x: torch.Tensor, y: torch.Tensor, train_x: torch.Tensor, split: str,
    preprocess: Preprocess, num_classes: int, runtime: Runtime, batch_size: int,
) -> dict[str, Any]:
    """The teacher's accuracy on (the first CHECK_SAMPLES of) `x`, with what was tried when it is near chance."""
    x, y = x[:CHECK_SAMPLES], y[:CHECK_SAMPLES].cpu()

    def score(prep: nn.Module, inputs: torch.Tensor = x) -> tuple[float, torch.Tensor]:
        logits = predict_logits(teacher, inputs, preprocess=prep.to(runtime.device), runtime=runtime,
                                batch_size=batch_size)
        return (logits.argmax(dim=1) == y).float().mean().item(), logits

    _, logits = score(preprocess)
    result = score_predictions(logits, y, num_classes=num_classes, split=split)
    if result["passed"]:
        return result
    input_shape = tuple(int(d) for d in x.shape[1:])
    tried: list[dict[str, Any]] = []
    if len(input_shape) == 3:
        mean, std = data_statistics(train_x)
        tried.append({"fix": "normalize", "what": f"the data's own normalisation (mean {_rounded(mean)}, std "
                      f"{_rounded(std)})", "mean": mean, "std": std,
                      "accuracy": score(Preprocess(mean, std, input_shape))[0]})
        if preprocess.mean.abs().max() > 0 or (preprocess.std - 1).abs().max() > 0:
            tried.append({"fix": "normalize", "what": "no normalisation (mean 0, std 1)", "mean": [0.0], "std": [1.0],
                          "accuracy": score(Preprocess([0.0], [1.0], input_shape))[0]})
        if input_shape[0] == 3:
            tried.append({"fix": "normalize", "what": "ImageNet's normalisation", "mean": IMAGENET[0],
                          "std": IMAGENET[1], "accuracy": score(Preprocess(*IMAGENET, input_shape))[0]})
            tried.append({"fix": "channels", "what": "the colour channels reversed (RGB <-> BGR)",
                          "accuracy": score(preprocess, x.flip(1))[0]})
    result["tried"] = tried + label_orders_tried(logits, y, num_classes)
    return result


def score_predictions(logits: torch.Tensor, y: torch.Tensor, *, num_classes: int, split: str) -> dict[str, Any]:
    """The check's verdict on a teacher's logits for labels `y`: accuracy against chance (any task).

    Chance is the larger of uniform guessing and always answering the commonest class.
    """
    y = y.cpu()
    accuracy = (logits.argmax(dim=1).cpu() == y).float().mean().item() if len(y) else 0.0
    counts = torch.bincount(y, minlength=num_classes)
    chance = max(1.0 / num_classes, counts.max().item() / max(1, len(y)))
    threshold = near_chance_threshold(chance)
    return {"split": split, "samples": len(y), "accuracy": accuracy, "chance": chance, "threshold": threshold,
            "passed": accuracy >= threshold, "tried": []}


def label_orders_tried(logits: torch.Tensor, y: torch.Tensor, num_classes: int) -> list[dict[str, Any]]:
    """The teacher's score under the label mapping that best fits its confusion matrix (if not the identity)."""
    mapping, mapped = best_label_mapping(confusion_matrix(logits.cpu(), y.cpu(), num_classes))
    if mapping == list(range(num_classes)):
        return []
    return [{"fix": "labels", "what": "another label order (the best mapping of the teacher's classes onto the "
             "data's)", "mapping": mapping, "accuracy": mapped / max(1, len(y))}]


def data_statistics(train_x: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of stored images, on the scale the models see (uint8 / 255)."""
    sample = train_x[:STATS_SAMPLES].float()
    if train_x.dtype == torch.uint8:
        sample = sample / 255.0
    per_channel = sample.transpose(0, 1).reshape(sample.shape[1], -1)
    return per_channel.mean(dim=1).tolist(), per_channel.std(dim=1).clamp_min(1e-6).tolist()


def best_label_mapping(confusion: Sequence[Sequence[int]]) -> tuple[list[int], int]:
    """The one-to-one relabelling of predictions that maximises correct counts (the assignment problem).

    Returns `mapping` (predicted class p counts as data class mapping[p]) and the samples it gets right.
    Hungarian method, O(n^3); the classes of one job are few.
    """
    n = len(confusion)
    # Minimise cost = -count; rows are predicted classes, columns data classes.
    cost = [[-confusion[true][pred] for true in range(n)] for pred in range(n)]
    inf = float("inf")
    u, v = [0.0] * (n + 1), [0.0] * (n + 1)
    match, way = [0] * (n + 1), [0] * (n + 1)  # match[column] = row, both 1-based (0 = none)
    for row in range(1, n + 1):
        match[0], column = row, 0
        least, used = [inf] * (n + 1), [False] * (n + 1)
        while match[column] != 0:
            used[column] = True
            current, delta, next_column = match[column], inf, 0
            for j in range(1, n + 1):
                if not used[j]:
                    reduced = cost[current - 1][j - 1] - u[current] - v[j]
                    if reduced < least[j]:
                        least[j], way[j] = reduced, column
                    if least[j] < delta:
                        delta, next_column = least[j], j
            for j in range(n + 1):
                if used[j]:
                    u[match[j]] += delta
                    v[j] -= delta
                else:
                    least[j] -= delta
            column = next_column
        while column:
            previous = way[column]
            match[column] = match[previous]
            column = previous
    mapping = [0] * n
    for column in range(1, n + 1):
        mapping[match[column] - 1] = column - 1
    return mapping, sum(confusion[mapping[pred]][pred] for pred in range(n))


def check_message(result: dict[str, Any]) -> str:
    """One paragraph: the score, why it is suspect, what each alternative gives and what to change."""
    text = (f"the teacher scores {_pct(result['accuracy'])} on {result['samples']:,} samples of the {result['split']} "
            f"before any training, near chance ({_pct(result['chance'])} for this data); its inputs or labels "
            "probably do not match how it was trained")
    tried = sorted(result["tried"], key=lambda t: -t["accuracy"])
    if tried:
        text += ". Tried: " + "; ".join(f"with {t['what']} it scores {_pct(t['accuracy'])}" for t in tried)
        best = tried[0]
        if best["accuracy"] >= result["threshold"]:
            text += f". {_advice(best)}"
    return text


def check_field(result: dict[str, Any]) -> str:
    """The spec field the most promising fix would change (data.normalize, data.train, teacher.file)."""
    tried = [t for t in result["tried"] if t["accuracy"] >= result["threshold"]]
    if not tried:
        return "teacher.file"
    fix = max(tried, key=lambda t: t["accuracy"])["fix"]
    return {"normalize": "data.normalize", "labels": "data.train"}.get(fix, "data.train")


def enforce(result: dict[str, Any], mode: str, *, teacher_adapts: bool) -> str | None:
    """Raise (mode fail) or return the warning (mode warn, or a teacher about to be fine-tuned on this data)."""
    if result["passed"] or mode == "off":
        return None
    message = check_message(result)
    if mode == "fail" and not teacher_adapts:
        raise KDError(f"{message}. To run anyway, set stages.teacher_check: warn",
                      field=check_field(result), code="teacher_check_failed")
    return message


def _advice(best: dict[str, Any]) -> str:
    if best["fix"] == "normalize":
        return (f"Set data.normalize to mean {_rounded(best['mean'])}, std {_rounded(best['std'])} "
                "(what the teacher was trained with)")
    if best["fix"] == "channels":
        return "The data's colour channels are probably in the other order than the teacher's: convert them"
    pairs = ", ".join(f"{pred}->{true}" for pred, true in enumerate(best["mapping"]) if pred != true)
    return (f"The teacher's class order probably differs from the data's (teacher class -> data class: {pairs}); "
            "ImageFolder zips number classes by sorted folder name; text labels follow the teacher's id2label "
            "where it names them, else their sorted order")


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def _rounded(values: Sequence[float]) -> list[float]:
    return [round(float(v), 3) for v in values]
