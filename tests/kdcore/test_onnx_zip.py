"""ONNX teachers with external data, uploaded as a .zip of the model and its data files."""

import zipfile
from pathlib import Path

import onnx
import pytest
import torch

from kdcore.errors import BadInputError
from kdcore.spec import TeacherSpec
from kdcore.teacher import load_teacher
from kdcore.teacher_sniff import sniff_teacher


def _external_model(teacher_zoo, folder: Path, location: str = "teacher.onnx.data") -> Path:
    model = onnx.load(str(teacher_zoo.files["onnx"]))
    (folder / location).parent.mkdir(parents=True, exist_ok=True)
    target = folder / "teacher.onnx"
    onnx.save_model(model, str(target), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location, size_threshold=0)
    return target


def _zip(path: Path, members: dict[str, Path | bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content in members.items():
            if isinstance(content, Path):
                archive.write(content, name)
            else:
                archive.writestr(name, content)
    return path


def test_a_bare_external_data_model_says_what_to_upload(teacher_zoo, tmp_path: Path) -> None:
    model = _external_model(teacher_zoo, tmp_path)
    with pytest.raises(BadInputError) as caught:
        sniff_teacher(model)
    message = caught.value.message
    assert "teacher.onnx.data" in message  # the file it is missing, by name
    assert "zip teacher.zip teacher.onnx teacher.onnx.data" in message and "upload the .zip" in message
    assert "external_data=False" in message


def test_a_zip_of_model_and_data_loads_and_scores_like_pytorch(teacher_zoo, tmp_path: Path) -> None:
    model = _external_model(teacher_zoo, tmp_path / "export")
    upload = _zip(tmp_path / "teacher.bin", {"teacher.onnx": model, "teacher.onnx.data": model.parent /
                                             "teacher.onnx.data"})
    info = sniff_teacher(upload)
    assert info.format == "onnx" and info.output_size == teacher_zoo.num_classes
    assert info.onnx is not None and info.onnx.data_members == ["teacher.onnx.data"]
    expected = sum(p.numel() for p in teacher_zoo.model.parameters())
    assert info.onnx.parameters == expected
    teacher = load_teacher(TeacherSpec(file=str(upload)), upload, input_shape=teacher_zoo.input_shape,
                           num_classes=teacher_zoo.num_classes)
    with torch.inference_mode():
        assert torch.allclose(teacher.module(teacher_zoo.batch), teacher_zoo.model(teacher_zoo.batch), atol=1e-5)
    assert teacher.module.num_parameters == expected


def test_a_model_in_a_folder_of_the_zip_finds_its_data_beside_it(teacher_zoo, tmp_path: Path) -> None:
    model = _external_model(teacher_zoo, tmp_path / "export", location="weights/all.bin")
    upload = _zip(tmp_path / "teacher.zip", {"resnet/teacher.onnx": model,
                                             "resnet/weights/all.bin": model.parent / "weights" / "all.bin"})
    info = sniff_teacher(upload)
    assert info.onnx is not None and info.onnx.data_members == ["resnet/weights/all.bin"]
    load_teacher(TeacherSpec(file=str(upload)), upload, input_shape=teacher_zoo.input_shape,
                 num_classes=teacher_zoo.num_classes)


def test_a_zip_without_the_data_file_names_it(teacher_zoo, tmp_path: Path) -> None:
    model = _external_model(teacher_zoo, tmp_path / "export")
    upload = _zip(tmp_path / "teacher.zip", {"teacher.onnx": model})
    with pytest.raises(BadInputError, match=r"'teacher.onnx.data', which is not in the zip"):
        sniff_teacher(upload)


@pytest.mark.parametrize("location", ["../outside.bin", "/etc/passwd", "a\\..\\b"])
def test_data_paths_that_leave_the_zip_are_refused(teacher_zoo, tmp_path: Path, location: str) -> None:
    model = onnx.load(str(teacher_zoo.files["onnx"]))
    for tensor in model.graph.initializer:
        tensor.ClearField("raw_data")
        tensor.data_location = onnx.TensorProto.EXTERNAL
        tensor.external_data.add(key="location", value=location)
    upload = _zip(tmp_path / "teacher.zip", {"teacher.onnx": model.SerializeToString(), "outside.bin": b"x" * 64})
    with pytest.raises(BadInputError, match="names its data file unsafely"):
        sniff_teacher(upload)


def test_a_data_range_past_the_member_is_refused(teacher_zoo, tmp_path: Path) -> None:
    model = _external_model(teacher_zoo, tmp_path / "export")
    data = (model.parent / "teacher.onnx.data").read_bytes()
    upload = _zip(tmp_path / "teacher.zip", {"teacher.onnx": model, "teacher.onnx.data": data[: len(data) // 2]})
    with pytest.raises(BadInputError, match="truncated or belongs to another export"):
        sniff_teacher(upload)


def test_two_models_in_one_zip_are_refused(teacher_zoo, tmp_path: Path) -> None:
    onnx_file = teacher_zoo.files["onnx"]
    upload = _zip(tmp_path / "teacher.zip", {"a.onnx": onnx_file, "b.onnx": onnx_file})
    with pytest.raises(BadInputError, match=r"holds 2 \.onnx models"):
        sniff_teacher(upload)


def test_the_zip_limits_apply(teacher_zoo, tmp_path: Path) -> None:
    from kdcore.archive import ArchiveLimits

    model = _external_model(teacher_zoo, tmp_path / "export")
    upload = _zip(tmp_path / "teacher.zip", {"teacher.onnx": model, "teacher.onnx.data": model.parent /
                                             "teacher.onnx.data"})
    with pytest.raises(BadInputError, match="more than the limit"):
        sniff_teacher(upload, archive_limits=ArchiveLimits(max_member_bytes=64))


def test_a_dataset_given_as_the_teacher_is_named_as_such(tmp_path: Path) -> None:
    import numpy as np

    np.savez(tmp_path / "data.npz", x_train=np.zeros((4, 2, 2), np.uint8), y_train=np.zeros(4, np.int64))
    with pytest.raises(BadInputError, match=r"this looks like a dataset \(an .npz of arrays x_train, y_train\)"):
        sniff_teacher(tmp_path / "data.npz")
    images = _zip(tmp_path / "folders.zip", {f"train/{c}/{i}.png": b"\x89PNG" for c in "ab" for i in range(3)})
    with pytest.raises(BadInputError, match=r"this looks like a dataset \(an ImageFolder zip of 6 images"):
        sniff_teacher(images)


def test_sniffing_an_onnx_zip_does_not_import_torch(teacher_zoo, tmp_path: Path) -> None:
    import subprocess
    import sys

    model = _external_model(teacher_zoo, tmp_path / "export")
    upload = _zip(tmp_path / "teacher.zip", {"teacher.onnx": model, "teacher.onnx.data": model.parent /
                                             "teacher.onnx.data"})
    code = ("import sys; from kdcore.teacher_sniff import sniff_teacher; "
            f"print(sniff_teacher({str(upload)!r}).format); print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["onnx", "False"]


@pytest.mark.parametrize("name", ["safetensors", "onnx", "state_dict", "torchscript"])
def test_a_teacher_given_as_data_is_named_as_such(teacher_zoo, name: str) -> None:
    from kdcore.data_sniff import sniff_dataset

    with pytest.raises(BadInputError, match=r"this looks like a teacher model \(.*\), not a dataset: give it as "
                                            r"teacher.file"):
        sniff_dataset(teacher_zoo.files[name])


def test_data_that_is_neither_still_gets_the_plain_message(tmp_path: Path) -> None:
    from kdcore.data_sniff import sniff_dataset

    junk = tmp_path / "junk.bin"
    junk.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(BadInputError, match="not a dataset: not a zip archive"):
        sniff_dataset(junk)
