"""A tune space applied to a job spec: which dotted paths may be searched, and a trial's settings put in place.

Torch-free (the API validates spaces with it). A space maps a dotted path of the spec
(`method.temperature`, `student.arch_args.hidden`) to a list of choices or a range
{low, high, log, step}; a trial's settings are one value per path.
"""

from __future__ import annotations

import copy
from typing import Any

from pydantic import BaseModel

# Paths that name the job's inputs or its bookkeeping: searching them would change what is
# being distilled (other files, another split), not how well.
FORBIDDEN_PREFIXES = ("teacher", "data.train", "data.test", "data.val_fraction", "tune", "name", "device",
                      "export", "seed", "threads", "eval_batch_size", "precision", "distributed")
# Free-form mappings: any key below them is accepted here and checked by the field's own validator.
OPEN_MAPPINGS = ("student.arch_args",)


def check_path(model: type[BaseModel], path: str) -> str | None:
    """Why `path` cannot be searched, or None when it can (the value's type is checked separately)."""
    parts = path.split(".")
    if not path or any(not part for part in parts):
        return "is not a dotted path of the spec (like method.temperature)"
    if any(path == prefix or path.startswith(prefix + ".") for prefix in FORBIDDEN_PREFIXES):
        return "names the job's inputs or bookkeeping, which a search must not change"
    for open_mapping in OPEN_MAPPINGS:
        if path.startswith(open_mapping + "."):
            return None if len(parts) == len(open_mapping.split(".")) + 1 else "goes below an argument's value"
    current: type[BaseModel] | None = model
    for index, part in enumerate(parts):
        if current is None or part not in current.model_fields:
            where = ".".join(parts[:index]) or "the spec"
            return f"does not exist: {where} has no field {part!r}"
        annotation = current.model_fields[part].annotation
        current = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    if current is not None:
        return "names a whole section; name one of its fields"
    return None


def apply_settings(spec_data: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    """A copy of the spec (as JSON data) with each dotted path set to its trial value."""
    data = copy.deepcopy(spec_data)
    for path, value in settings.items():
        *parents, leaf = path.split(".")
        node = data
        for part in parents:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        node[leaf] = copy.deepcopy(value)
    return data


def current_value(spec_data: dict[str, Any], path: str) -> Any:
    """The value at a dotted path of the spec's JSON data (None where it is unset)."""
    node: Any = spec_data
    for part in path.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node
