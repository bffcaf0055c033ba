"""Load a user's teacher model into an `nn.Module` the engine can run, and check it fits the data.

Teacher files are untrusted. Safe formats load by default: safetensors and plain state_dicts
(the latter only through `torch.load(weights_only=True)`, never a fallback) into a registry
architecture, and ONNX through onnxruntime. TorchScript and torch.export programs carry code,
so they load only when the operator allows it (`DISTILLERY_ALLOW_CODE_TEACHERS`).
"""

from __future__ import annotations

import pickle
import re
import shutil
import tempfile
import types
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kdcore.archive import safe_member_path
from kdcore.errors import BadInputError, KDError, MismatchError, UnsafeFormatError
from kdcore.limits import ResourceLimitError
from kdcore.models import build_model
from kdcore.onnx_sniff import OnnxFacts
from kdcore.spec import TeacherSpec
from kdcore.teacher_mismatch import Rebuild, adapt_channel_prefix, explain_mismatch
from kdcore.teacher_sniff import ALLOW_CODE_SETTING, DEFAULT_MAX_BYTES, TeacherInfo, sniff_teacher

_FORMAT_NAMES = {
    "safetensors": "safetensors",
    "onnx": "ONNX",
    "state_dict": "a torch.save state_dict",
    "torchscript": "TorchScript",
    "exported": "a torch.export program (.pt2)",
}
# Checkpoints often wrap the weights next to optimizer state, epochs and the like.
_WRAPPER_KEYS = ("state_dict", "model")
_ONNX_INPUT_DTYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
}
_MAX_LISTED = 5
_TIMES = "\u00d7"  # the multiplication sign: shapes read like the docs (C, H, W joined by it)


@dataclass
class Teacher:
    """A loaded teacher. `module` is always an nn.Module so `.eval()`/`.to()` work the same for all."""

    module: nn.Module
    format: str
    trainable: bool
    arch: str | None
    info: TeacherInfo
    device: torch.device


def load_teacher(
    spec: TeacherSpec,
    path: str | Path,
    *,
    input_shape: Sequence[int],
    num_classes: int,
    allow_code: bool = False,
    device: str | torch.device = "cpu",
    max_bytes: int = DEFAULT_MAX_BYTES,
    onnx_arena_bytes: int | None = None,
) -> Teacher:
    """Load the teacher file at `path` as `spec` describes, for samples of `input_shape` and `num_classes`.

    `input_shape` and `num_classes` come from the data; they are needed to build the registry
    architecture that safetensors and state_dict weights are loaded into.
    """
    path = Path(path)
    info = sniff_teacher(path, max_bytes=max_bytes)
    if spec.format not in ("auto", info.format):
        raise BadInputError(
            f"file is {_FORMAT_NAMES[info.format]}, not {_FORMAT_NAMES[spec.format]}", field="teacher.format"
        )
    target = torch.device(device)
    if info.format in ("safetensors", "state_dict"):
        state = _read_safetensors(path) if info.format == "safetensors" else _read_state_dict(path)
        module = _build_and_load(spec, info.format, state, input_shape, num_classes)
        return Teacher(module.to(target), info.format, True, spec.arch, info, target)
    if info.format == "onnx":
        return Teacher(_load_onnx(path, target, onnx_arena_bytes, info), "onnx", False, spec.arch, info, target)
    _require_code_allowed(info.format, allow_code)
    if info.format == "torchscript":
        return Teacher(_load_torchscript(path).to(target), "torchscript", True, spec.arch, info, target)
    # An exported graph is frozen in the train/eval mode it was exported in: not fine-tunable here.
    return Teacher(_load_exported(path).to(target), "exported", False, spec.arch, info, target)


# --- weights into a registry architecture ------------------------------------------------------


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # the sniffer validated the header; anything left is a damaged file
        raise BadInputError(
            f"corrupt or truncated safetensors: {_last_line(exc)}", field="teacher.file"
        ) from None


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """torch.load with weights_only=True and nothing else: a pickle that needs more is refused."""
    try:
        loaded = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        raise UnsafeFormatError(
            "the torch.save file contains Python objects other than tensors; refused"
            f"{_refused_global(exc)}. Save `model.state_dict()` or use safetensors or ONNX instead",
            field="teacher.file",
        ) from None
    except Exception as exc:  # zip, EOF and storage errors from a damaged file
        raise BadInputError(
            f"corrupt or truncated torch.save file: {_last_line(exc)}", field="teacher.file"
        ) from None
    return _unwrap_state_dict(loaded)


def _refused_global(exc: Exception) -> str:
    match = re.search(r"GLOBAL ([\w.]+)", str(exc))
    return f" (it refers to {match.group(1)})" if match else ""


def _unwrap_state_dict(loaded: Any) -> dict[str, torch.Tensor]:
    if isinstance(loaded, Mapping) and not _all_tensors(loaded):
        for key in _WRAPPER_KEYS:
            if isinstance(loaded.get(key), Mapping):
                loaded = loaded[key]
                break
    if not isinstance(loaded, Mapping):
        raise BadInputError(
            f"not a state_dict: the file holds a {type(loaded).__name__}, not a mapping of names to tensors",
            field="teacher.file",
        )
    bad = [str(key) for key, value in loaded.items() if not isinstance(value, torch.Tensor)]
    if bad:
        raise BadInputError(
            f"not a state_dict: entries {_listed(bad)} are not tensors", field="teacher.file"
        )
    return _strip_data_parallel_prefix({str(key): value for key, value in loaded.items()})


def _all_tensors(mapping: Mapping[Any, Any]) -> bool:
    return all(isinstance(value, torch.Tensor) for value in mapping.values())


def _strip_data_parallel_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # nn.DataParallel / DDP checkpoints name every tensor `module.<name>`.
    if state and all(key.startswith("module.") for key in state):
        return {key.removeprefix("module."): value for key, value in state.items()}
    return state


def _build_and_load(
    spec: TeacherSpec, fmt: str, state: dict[str, torch.Tensor], input_shape: Sequence[int], num_classes: int
) -> nn.Module:
    if spec.arch is None:
        raise BadInputError(
            f"the file is {_FORMAT_NAMES[fmt]}, which holds weights only: name the registry architecture",
            field="teacher.arch",
        )
    try:
        model = build_model(spec.arch, spec.arch_args, input_shape, num_classes)
    except KDError as exc:  # e.g. an image architecture for flat feature vectors
        raise MismatchError(exc.message, field="teacher.arch") from None
    state = adapt_channel_prefix(model.state_dict(), state)
    arch = spec.arch

    def rebuild(arch_args: dict[str, Any]) -> Mapping[str, torch.Tensor] | None:
        try:  # on the meta device: only names and shapes are compared, so no memory or time is spent
            with torch.device("meta"):
                return build_model(arch, arch_args, input_shape, num_classes).state_dict()
        except (KDError, ValueError, TypeError):  # arguments this architecture does not take
            return None

    _check_keys_and_shapes(model, state, spec.arch, spec.arch_args, rebuild)
    model.load_state_dict(state, strict=True)
    return model


def _check_keys_and_shapes(model: nn.Module, state: dict[str, torch.Tensor], arch: str,
                           arch_args: dict[str, Any], rebuild: Rebuild | None = None) -> None:
    """Say which tensors disagree, in words, before load_state_dict says it less readably."""
    expected = model.state_dict()
    problems = []
    missing = [name for name in expected if name not in state]
    unexpected = [name for name in state if name not in expected]
    reshaped = [
        f"{name} {tuple(state[name].shape)} in the file vs {tuple(tensor.shape)} built"
        for name, tensor in expected.items()
        if name in state and state[name].shape != tensor.shape
    ]
    if missing:
        problems.append(f"missing {_listed(missing)}")
    if unexpected:
        problems.append(f"unexpected {_listed(unexpected)}")
    if reshaped:
        problems.append(f"shape mismatch {_listed(reshaped)}")
    if problems:
        plain = explain_mismatch(arch, arch_args, expected, state, rebuild)
        raise MismatchError(
            (f"{'; '.join(plain)}. In detail: " if plain else "")
            + f"the teacher's weights do not fit architecture {arch!r} with these arch_args and the data's "
            f"input shape and classes: {'; '.join(problems)}",
            field="teacher.arch_args" if any("did you mean" in line for line in plain) else "teacher.arch",
        )


def _listed(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f" and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else "")


# --- formats that carry code -----------------------------------------------------------------------


def _require_code_allowed(fmt: str, allow_code: bool) -> None:
    if not allow_code:
        raise UnsafeFormatError(
            f"the file is {_FORMAT_NAMES[fmt]}, which carries executable code and is refused by default; "
            f"the operator can allow such teachers with {ALLOW_CODE_SETTING}=1 (for trusted uploads only), "
            "or upload safetensors, ONNX or a state_dict instead",
            field="teacher.format",
        )


def _load_torchscript(path: Path) -> nn.Module:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, still loadable
            return torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        raise BadInputError(
            f"cannot load the TorchScript archive: {_last_line(exc)}", field="teacher.file"
        ) from None


def _load_exported(path: Path) -> nn.Module:
    try:
        # A file object, not the path: stored uploads have no .pt2 suffix and torch warns about that.
        with path.open("rb") as handle:
            module = torch.export.load(handle).module()
    except Exception as exc:
        raise BadInputError(
            f"cannot load the torch.export program: {_last_line(exc)}", field="teacher.file"
        ) from None
    # `ExportedProgram.module()` makes .train()/.eval() raise, by instance attributes. The engine
    # calls them on every teacher, so replace them (the same way) with ones that only set the flag:
    # the graph keeps the mode it was exported in. Wrapping instead would rename every parameter.
    module.train = types.MethodType(_set_training_flag, module)  # type: ignore[method-assign]
    module.eval = types.MethodType(_clear_training_flag, module)  # type: ignore[method-assign]
    return module


def _set_training_flag(self: nn.Module, mode: bool = True) -> nn.Module:
    self.training = mode
    return self


def _clear_training_flag(self: nn.Module) -> nn.Module:
    return _set_training_flag(self, False)


# --- ONNX ------------------------------------------------------------------------------------------


class OnnxTeacher(nn.Module):
    """Wraps an onnxruntime session as a module: tensor in, float32 logits out on the input's device."""

    def __init__(self, session: Any, model_path: Path, facts: OnnxFacts | None = None,
                 unpacked: tempfile.TemporaryDirectory[str] | None = None) -> None:
        super().__init__()
        self.session = session
        self.model_path = model_path  # where a second session (CPU latency) can be opened from
        self._unpacked = unpacked  # a zipped model's files live as long as the teacher does
        # Counted from the graph's initializers: the session has no parameters for PyTorch to count.
        self.num_parameters = facts.parameters if facts is not None else 0
        self.weight_bytes = facts.weight_bytes if facts is not None else 0
        model_input = session.get_inputs()[0]
        self.input_name: str = model_input.name
        self.input_dtype = _ONNX_INPUT_DTYPES[model_input.type]
        self.output_name: str = session.get_outputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        array = x.detach().to("cpu", torch.float32).contiguous().numpy().astype(self.input_dtype, copy=False)
        try:
            (output,) = self.session.run([self.output_name], {self.input_name: array})
        except Exception as exc:
            if "bfc_arena" in str(exc) or "Available memory of" in str(exc):
                raise ResourceLimitError(
                    "the ONNX teacher asked onnxruntime for more memory than its arena limit "
                    "(onnx_arena_bytes, set by DISTILLERY_ONNX_ARENA_BYTES); a teacher graph must not "
                    f"build tensors that large: {_last_line(exc)}",
                    field="teacher.file",
                ) from None
            raise
        return torch.from_numpy(np.asarray(output, dtype=np.float32)).to(x.device)


def _limit_onnx_arena(ort: Any, options: Any, max_bytes: int) -> None:
    """Make the session allocate from a CPU arena of at most `max_bytes`: a graph that asks for more
    (a `ConstantOfShape` of 16 GiB) fails with an error instead of taking the machine's memory."""
    info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    # kSameAsRequested (1): the arena grows by what is asked, so max_mem is the bound, not a rounding of it.
    config = ort.OrtArenaCfg(max_bytes, 1, -1, -1)
    try:
        ort.create_and_register_allocator(info, config)
    except Exception as exc:  # one shared allocator per process: a second teacher reuses the first's
        if "already" not in str(exc).lower():
            raise
    options.add_session_config_entry("session.use_env_allocators", "1")


def _unpack_onnx_zip(path: Path, facts: OnnxFacts) -> tuple[Path, tempfile.TemporaryDirectory[str]]:
    """Copy the zipped model and the data files it names (nothing else) into a private folder."""
    assert facts.archive_member is not None
    folder = tempfile.TemporaryDirectory(prefix="onnx-teacher-")
    root = Path(folder.name)
    with zipfile.ZipFile(path) as archive:
        for name in (facts.archive_member, *facts.data_members):
            target = safe_member_path(root, name)
            target.parent.mkdir(parents=True, exist_ok=True)
            info = archive.getinfo(name)
            with archive.open(info) as source, target.open("wb") as sink:
                # The sniffer checked the declared size; a member that inflates past it is not copied further.
                shutil.copyfileobj(source, sink, length=1 << 20)
            if target.stat().st_size != info.file_size:
                raise BadInputError(f"zip member {name!r} is not the size it declares", field="teacher.file")
    return safe_member_path(root, facts.archive_member), folder


def _load_onnx(path: Path, device: torch.device, arena_bytes: int | None = None,
               info: TeacherInfo | None = None) -> nn.Module:
    import onnxruntime as ort  # only ONNX teachers need it

    facts = info.onnx if info is not None else None
    unpacked = None
    if facts is not None and facts.archive_member is not None:
        path, unpacked = _unpack_onnx_zip(path, facts)
    options = ort.SessionOptions()
    if arena_bytes is not None:
        _limit_onnx_arena(ort, options, arena_bytes)
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: shape-inference warnings are not the user's business
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=_onnx_providers(device))
    except Exception as exc:
        raise BadInputError(
            f"onnxruntime cannot load the ONNX model: {_last_line(exc)}", field="teacher.file"
        ) from None
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise BadInputError(
            f"the ONNX teacher must take exactly one input (the image batch); it takes {len(inputs)}: "
            f"{_listed([value.name for value in inputs])}",
            field="teacher.file",
        )
    if inputs[0].type not in _ONNX_INPUT_DTYPES:
        raise BadInputError(
            f"the ONNX teacher takes {inputs[0].type} input; only float tensors can carry images",
            field="teacher.file",
        )
    return OnnxTeacher(session, path, facts, unpacked)


def _onnx_providers(device: torch.device) -> list[str | tuple[str, dict[str, Any]]]:
    import onnxruntime as ort

    if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        return [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


# --- the one-batch check ---------------------------------------------------------------------------


def check_teacher_fits(teacher: Teacher, sample: torch.Tensor, num_classes: int) -> None:
    """Run one small normalised float32 batch through the teacher; raise if it does not fit the data."""
    sample_shape = _shape_text(sample.shape[1:])
    expected = teacher.info.input_shape
    if expected is not None and not _shape_fits(expected, sample.shape[1:]):
        channels = ""
        if len(expected) == 3 == sample.dim() - 1 and expected[0] is not None and expected[0] != sample.shape[1]:
            channels = f"the teacher expects {expected[0]} input channels, the data has {sample.shape[1]}: "
        raise MismatchError(
            f"{channels}teacher expects input {_shape_text(expected)} but the data's samples are {sample_shape}",
            field="teacher",
        )
    output = _run_once(teacher, sample.to(teacher.device), sample_shape)
    _check_logits(output, len(sample), num_classes)


def _run_once(teacher: Teacher, sample: torch.Tensor, sample_shape: str) -> Any:
    module = teacher.module
    was_training = module.training
    module.eval()
    try:
        with torch.inference_mode():
            return module(sample)
    except Exception as exc:  # whatever the model raises, the cause is what we fed it
        raise MismatchError(
            f"teacher expects input of another shape but the data's samples are {sample_shape} "
            f"(float32); it failed with: {_last_line(exc)}",
            field="teacher",
        ) from None
    finally:
        module.train(was_training)


def _check_logits(output: Any, batch: int, num_classes: int) -> None:
    if not isinstance(output, torch.Tensor):
        raise MismatchError(
            f"teacher returned a {type(output).__name__}, not a tensor of logits", field="teacher"
        )
    if output.ndim != 2 or output.shape[0] != batch:
        raise MismatchError(
            f"teacher output has shape {tuple(output.shape)}; expected logits of shape [{batch}, classes] "
            f"for a batch of {batch}",
            field="teacher",
        )
    classes = output.shape[1]
    if classes != num_classes:
        raise MismatchError(
            f"the teacher has {classes} outputs, the data {num_classes} classes: teacher outputs {classes} "
            f"classes but the data has labels 0..{num_classes - 1} ({num_classes} classes)",
            field="teacher",
        )
    if not torch.isfinite(output).all():
        raise BadInputError(
            "teacher produced non-finite logits (NaN or inf) on the first batch", field="teacher"
        )


def _shape_fits(expected: Sequence[int | None], actual: Sequence[int]) -> bool:
    if len(expected) != len(actual):
        return False
    return all(want is None or want == got for want, got in zip(expected, actual, strict=True))


def _shape_text(shape: Sequence[int | None]) -> str:
    return _TIMES.join("?" if dim is None else str(dim) for dim in shape) or "scalars"


def _last_line(exc: BaseException) -> str:
    """The informative part of a library error: TorchScript and ORT put it on the last line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1][:300] if lines else type(exc).__name__
