from __future__ import annotations

import builtins
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from kdcore.errors import BadInputError, MismatchError, UnsafeFormatError
from kdcore.models import build_model
from kdcore.spec import TeacherSpec
from kdcore.teacher import Teacher, check_teacher_fits, load_teacher
from kdcore.teacher_sniff import TeacherInfo

CODE_FORMATS = ("torchscript", "exported")
ALL_FILES = ("safetensors", "state_dict", "legacy", "checkpoint", "onnx", "torchscript", "exported")
FORMAT_OF = {"legacy": "state_dict", "checkpoint": "state_dict"}


@pytest.fixture(autouse=True)
def _few_threads() -> None:
    torch.set_num_threads(2)


def _spec(zoo: Any, path: Path, fmt: str = "auto", **changes: Any) -> TeacherSpec:
    fields: dict[str, Any] = {"file": str(path), "format": fmt, "arch": zoo.arch, "arch_args": zoo.arch_args}
    return TeacherSpec(**(fields | changes))


def _load(zoo: Any, name: str, fmt: str = "auto", **kwargs: Any) -> Teacher:
    path = zoo.files[name]
    return load_teacher(
        _spec(zoo, path, fmt), path, input_shape=zoo.input_shape, num_classes=zoo.num_classes, **kwargs
    )


def _load_path(zoo: Any, path: Path, fmt: str = "auto", **kwargs: Any) -> Teacher:
    return load_teacher(
        _spec(zoo, path, fmt), path, input_shape=zoo.input_shape, num_classes=zoo.num_classes, **kwargs
    )


# --- every format loads and gives the original logits ----------------------------------------------


@pytest.mark.parametrize("name", ALL_FILES)
@pytest.mark.parametrize("explicit", [False, True])
def test_each_format_gives_the_original_logits(teacher_zoo, name: str, explicit: bool) -> None:
    fmt = FORMAT_OF.get(name, name)
    teacher = _load(teacher_zoo, name, fmt if explicit else "auto", allow_code=True)
    assert teacher.format == fmt
    assert isinstance(teacher.module, nn.Module)
    teacher.module.eval()
    with torch.inference_mode():
        got = teacher.module(teacher_zoo.batch)
        want = teacher_zoo.model(teacher_zoo.batch)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("name", "trainable"),
    [
        ("safetensors", True), ("state_dict", True), ("onnx", False),
        ("torchscript", True), ("exported", False),
    ],
)
def test_trainable_flag(teacher_zoo, name: str, trainable: bool) -> None:
    assert _load(teacher_zoo, name, allow_code=True).trainable is trainable


def test_onnx_teacher_runs_any_batch_size(teacher_zoo) -> None:
    teacher = _load(teacher_zoo, "onnx")
    batch = torch.randn(17, *teacher_zoo.input_shape)
    with torch.inference_mode():
        torch.testing.assert_close(teacher.module(batch), teacher_zoo.model(batch), atol=1e-5, rtol=1e-5)


def test_data_parallel_prefix_is_stripped(teacher_zoo, tmp_path: Path) -> None:
    path = tmp_path / "ddp.pt"
    torch.save({f"module.{k}": v for k, v in teacher_zoo.model.state_dict().items()}, path)
    teacher = _load_path(teacher_zoo, path)
    with torch.inference_mode():
        torch.testing.assert_close(teacher.module(teacher_zoo.batch), teacher_zoo.model(teacher_zoo.batch))


# --- code-carrying formats ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", CODE_FORMATS)
@pytest.mark.parametrize("explicit", [False, True])
def test_code_formats_are_refused_without_allow_code(teacher_zoo, name: str, explicit: bool) -> None:
    with pytest.raises(UnsafeFormatError, match="DISTILLERY_ALLOW_CODE_TEACHERS") as caught:
        _load(teacher_zoo, name, name if explicit else "auto")
    assert caught.value.field == "teacher.format"
    assert caught.value.code == "unsafe_format"


def test_exported_teacher_accepts_eval_and_train_and_keeps_parameter_names(teacher_zoo) -> None:
    module = _load(teacher_zoo, "exported", allow_code=True).module
    assert module.eval().training is False
    assert module.train().training is True
    # init_from_teacher matches tensors by name, so loading must not rename them.
    assert {name for name, _ in module.named_parameters()} == {
        name for name, _ in teacher_zoo.model.named_parameters()
    }


# --- malicious pickles ---------------------------------------------------------------------------------


class _WritesMarker:
    """Unpickling this runs exec(), which writes a marker file: what an attacker's checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (builtins.exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def _malicious_files(tmp_path: Path, marker: Path) -> dict[str, Path]:
    payload = {"0.weight": torch.zeros(2, 2), "evil": _WritesMarker(marker)}
    zipped, raw = tmp_path / "evil_zip.pt", tmp_path / "evil_raw.pkl"
    torch.save(payload, zipped)
    raw.write_bytes(pickle.dumps({"0.weight": 1.0, "evil": _WritesMarker(marker)}, protocol=2))
    return {"zip": zipped, "raw": raw}


def test_the_malicious_payload_is_live(tmp_path: Path) -> None:
    """The control: an ordinary unpickler does run the payload, so the refusals below mean something."""
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_WritesMarker(control), protocol=2))  # deliberately unsafe
    assert control.read_text() == "pwned"


@pytest.mark.parametrize("kind", ["zip", "raw"])
@pytest.mark.parametrize("fmt", ["auto", "state_dict"])
def test_malicious_pickle_is_refused_and_never_runs(teacher_zoo, tmp_path: Path, kind: str, fmt: str) -> None:
    marker = tmp_path / "pwned"
    path = _malicious_files(tmp_path, marker)[kind]
    refused = "contains Python objects other than tensors; refused"
    with pytest.raises(UnsafeFormatError, match=refused) as caught:
        _load_path(teacher_zoo, path, fmt, allow_code=True)
    assert "exec" in caught.value.message
    assert not marker.exists()


def test_pickled_whole_module_is_refused(teacher_zoo, tmp_path: Path) -> None:
    path = tmp_path / "whole.pt"
    torch.save(teacher_zoo.model, path)
    with pytest.raises(UnsafeFormatError, match="refused"):
        _load_path(teacher_zoo, path)


def test_state_dict_with_non_tensors(teacher_zoo, tmp_path: Path) -> None:
    path = tmp_path / "odd.pt"
    torch.save({"0.weight": torch.zeros(1), "note": "hello"}, path)
    with pytest.raises(BadInputError, match="not a state_dict: entries note are not tensors"):
        _load_path(teacher_zoo, path)


# --- corrupt files ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "fraction", "message"),
    [
        ("safetensors", 0.5, "corrupt or truncated safetensors"),
        ("onnx", 0.5, "corrupt or truncated ONNX"),
        ("state_dict", 0.5, "corrupt or truncated zip archive"),
        ("legacy", 0.5, "corrupt or truncated torch.save file"),
        ("legacy", 0.02, "corrupt or truncated torch.save file"),
    ],
)
def test_truncated_files(teacher_zoo, tmp_path: Path, name: str, fraction: float, message: str) -> None:
    data = teacher_zoo.files[name].read_bytes()
    path = tmp_path / "cut"
    path.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(BadInputError, match=message) as caught:
        _load_path(teacher_zoo, path)
    assert caught.value.field == "teacher.file"


@pytest.mark.parametrize(
    ("data", "message"),
    [(b"", "empty file"), (b"\x42" + bytes(range(256)) * 8, "not a teacher model: file starts with")],
)
def test_empty_and_random_files(teacher_zoo, tmp_path: Path, data: bytes, message: str) -> None:
    path = tmp_path / "junk"
    path.write_bytes(data)
    with pytest.raises(BadInputError, match=message):
        _load_path(teacher_zoo, path)


def test_file_over_max_bytes(teacher_zoo) -> None:
    with pytest.raises(BadInputError, match="larger than the limit"):
        _load(teacher_zoo, "safetensors", max_bytes=64)


# --- the spec disagrees with the file ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "fmt", "message"),
    [
        ("onnx", "safetensors", "file is ONNX, not safetensors"),
        ("safetensors", "onnx", "file is safetensors, not ONNX"),
        ("torchscript", "state_dict", "file is TorchScript, not a torch.save state_dict"),
        ("state_dict", "exported", r"file is a torch.save state_dict, not a torch.export program \(.pt2\)"),
    ],
)
def test_explicit_format_must_match_content(teacher_zoo, name: str, fmt: str, message: str) -> None:
    with pytest.raises(BadInputError, match=message) as caught:
        _load(teacher_zoo, name, fmt, allow_code=True)
    assert caught.value.field == "teacher.format"


def test_weights_need_an_architecture(teacher_zoo) -> None:
    path = teacher_zoo.files["safetensors"]
    spec = TeacherSpec(file=str(path))
    with pytest.raises(BadInputError, match="holds weights only") as caught:
        load_teacher(spec, path, input_shape=teacher_zoo.input_shape, num_classes=teacher_zoo.num_classes)
    assert caught.value.field == "teacher.arch"


@pytest.mark.parametrize("name", ["safetensors", "state_dict"])
def test_weights_that_do_not_fit_the_architecture(teacher_zoo, name: str) -> None:
    path = teacher_zoo.files[name]
    spec = _spec(teacher_zoo, path, arch_args={"hidden": [16]})
    with pytest.raises(MismatchError, match="do not fit architecture 'mlp'") as caught:
        load_teacher(spec, path, input_shape=teacher_zoo.input_shape, num_classes=teacher_zoo.num_classes)
    assert caught.value.field == "teacher.arch_args"
    assert caught.value.message.startswith(
        "the teacher's file has 1 more layer than mlp(hidden=[16]) builds: did you mean hidden: [16, 8]?")
    unexpected = caught.value.message.split("unexpected ")[1].split(";")[0]
    assert set(unexpected.split(", ")) == {"5.weight", "5.bias"}
    assert "3.weight (8, 16) in the file vs (3, 16) built" in caught.value.message


def test_weights_for_other_number_of_classes(teacher_zoo) -> None:
    path = teacher_zoo.files["safetensors"]
    with pytest.raises(MismatchError, match=r"5.weight \(3, 8\) in the file vs \(12, 8\) built"):
        load_teacher(_spec(teacher_zoo, path), path, input_shape=teacher_zoo.input_shape, num_classes=12)


def test_image_architecture_for_flat_data_names_teacher_arch(teacher_zoo) -> None:
    path = teacher_zoo.files["safetensors"]
    spec = _spec(teacher_zoo, path, arch="cnn", arch_args={})
    with pytest.raises(MismatchError, match="needs image input") as caught:
        load_teacher(spec, path, input_shape=(16,), num_classes=teacher_zoo.num_classes)
    assert caught.value.field == "teacher.arch"


# --- check_teacher_fits --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["safetensors", "onnx", "torchscript", "exported"])
def test_fitting_teacher_passes_the_check(teacher_zoo, name: str) -> None:
    teacher = _load(teacher_zoo, name, allow_code=True)
    teacher.module.train()
    check_teacher_fits(teacher, teacher_zoo.batch, teacher_zoo.num_classes)
    assert teacher.module.training  # the check leaves the mode as it found it


@pytest.mark.parametrize("name", ["safetensors", "onnx", "torchscript", "exported"])
def test_wrong_input_shape(teacher_zoo, name: str) -> None:
    teacher = _load(teacher_zoo, name, allow_code=True)
    with pytest.raises(MismatchError, match="the data's samples are 1\u00d75\u00d75") as caught:
        check_teacher_fits(teacher, torch.randn(4, 1, 5, 5), teacher_zoo.num_classes)
    assert caught.value.field == "teacher"
    if name == "onnx":  # the graph says what it wants
        assert "teacher expects input 1\u00d74\u00d74" in caught.value.message


@pytest.mark.parametrize("name", ["safetensors", "onnx", "torchscript", "exported"])
def test_wrong_number_of_classes(teacher_zoo, name: str) -> None:
    teacher = _load(teacher_zoo, name, allow_code=True)
    message = r"teacher outputs 3 classes but the data has labels 0\.\.11 \(12 classes\)"
    with pytest.raises(MismatchError, match=message):
        check_teacher_fits(teacher, teacher_zoo.batch, 12)


def _teacher_around(module: nn.Module) -> Teacher:
    info = TeacherInfo(format="torchscript", details="hand-made")
    return Teacher(module, "torchscript", True, None, info, torch.device("cpu"))


def test_output_that_is_not_a_logits_matrix(teacher_zoo) -> None:
    message = r"teacher output has shape \(5, 1, 16\); expected logits of shape \[5,"
    with pytest.raises(MismatchError, match=message):
        check_teacher_fits(_teacher_around(nn.Flatten(2)), teacher_zoo.batch.view(5, 1, 16, 1), 3)


def test_non_finite_outputs(teacher_zoo) -> None:
    teacher = _load(teacher_zoo, "safetensors")
    batch = teacher_zoo.batch.clone()
    batch[0, 0, 0, 0] = float("nan")
    with pytest.raises(BadInputError, match="non-finite logits"):
        check_teacher_fits(teacher, batch, teacher_zoo.num_classes)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["safetensors", "state_dict", "onnx", "torchscript", "exported"])
def test_teacher_on_cuda(teacher_zoo, name: str) -> None:
    teacher = _load(teacher_zoo, name, allow_code=True, device="cuda")
    batch = teacher_zoo.batch.cuda()
    check_teacher_fits(teacher, batch, teacher_zoo.num_classes)
    with torch.inference_mode():
        got = teacher.module(batch)
    assert got.device.type == "cuda"
    torch.testing.assert_close(got.cpu(), teacher_zoo.model(teacher_zoo.batch), atol=1e-4, rtol=1e-4)


# --- mismatches in words ------------------------------------------------------------------------------


def _saved(model: nn.Module, path: Path) -> Path:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def test_a_forgotten_dropout_is_named(tmp_path: Path) -> None:
    with_dropout = build_model("mlp", {"hidden": [12, 12], "dropout": 0.2}, (1, 4, 4), 3)
    path = _saved(with_dropout, tmp_path / "t.safetensors")
    spec = TeacherSpec(file=str(path), arch="mlp", arch_args={"hidden": [12, 12]})
    with pytest.raises(MismatchError) as caught:
        load_teacher(spec, path, input_shape=(1, 4, 4), num_classes=3)
    assert caught.value.message.startswith(
        "the teacher's file fits mlp(hidden=[12, 12], dropout=0.5): did you mean dropout?")
    assert caught.value.field == "teacher.arch_args"


def test_other_hidden_widths_are_named(tmp_path: Path) -> None:
    path = _saved(build_model("mlp", {"hidden": [20, 10]}, (1, 4, 4), 3), tmp_path / "t.safetensors")
    spec = TeacherSpec(file=str(path), arch="mlp", arch_args={"hidden": [12, 12]})
    with pytest.raises(MismatchError, match=r"hidden widths are \[20, 10\].*did you mean hidden: \[20, 10\]\?"):
        load_teacher(spec, path, input_shape=(1, 4, 4), num_classes=3)


def test_a_three_channel_teacher_on_one_channel_data_says_so(tmp_path: Path) -> None:
    path = _saved(build_model("cnn", {"widths": [4], "hidden": 0}, (3, 8, 8), 3), tmp_path / "t.safetensors")
    spec = TeacherSpec(file=str(path), arch="cnn", arch_args={"widths": [4], "hidden": 0})
    with pytest.raises(MismatchError) as caught:
        load_teacher(spec, path, input_shape=(1, 8, 8), num_classes=3)
    assert caught.value.message.startswith("the teacher expects 3 input channels, the data has 1")


def test_a_teacher_with_other_outputs_says_so(tmp_path: Path) -> None:
    path = _saved(build_model("mlp", {"hidden": [8]}, (1, 4, 4), 10), tmp_path / "t.safetensors")
    spec = TeacherSpec(file=str(path), arch="mlp", arch_args={"hidden": [8]})
    with pytest.raises(MismatchError, match="the teacher has 10 outputs, the data 6 classes"):
        load_teacher(spec, path, input_shape=(1, 4, 4), num_classes=6)


def test_a_plain_torchvision_state_dict_loads_on_one_channel_data(tmp_path: Path) -> None:
    import torchvision

    torch.manual_seed(0)
    rgb = torchvision.models.get_model("resnet18", weights=None, num_classes=4).eval()
    path = _saved(rgb, tmp_path / "resnet.safetensors")
    teacher = load_teacher(TeacherSpec(file=str(path), arch="resnet18"), path, input_shape=(1, 32, 32),
                           num_classes=4)
    gray = torch.rand(2, 1, 32, 32)
    with torch.inference_mode():  # the adapter repeats the grey channel into the RGB model
        torch.testing.assert_close(teacher.module.eval()(gray), rgb(gray.expand(-1, 3, -1, -1)))


def test_onnx_teacher_with_other_channels_says_so(teacher_zoo) -> None:
    teacher = _load(teacher_zoo, "onnx")
    with pytest.raises(MismatchError, match="the teacher expects 1 input channels, the data has 3"):
        check_teacher_fits(teacher, torch.randn(4, 3, 4, 4), teacher_zoo.num_classes)
