"""Mismatch errors in human terms: what a user got wrong, said the way the issue words it, with the field to change."""

from pathlib import Path
from typing import Any

import pytest
from torch import nn

from kdcore.errors import MismatchError
from kdcore.models import build_model
from kdcore.spec import TeacherSpec
from kdcore.teacher import load_teacher


def _save(model: nn.Module, path: Path) -> Path:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _refused(tmp_path: Path, saved: tuple[str, dict[str, Any], tuple[int, ...], int], spec_arch: str,
             spec_args: dict[str, Any], input_shape: tuple[int, ...], num_classes: int) -> MismatchError:
    arch, args, shape, classes = saved
    path = _save(build_model(arch, args, shape, classes), tmp_path / "teacher.safetensors")
    with pytest.raises(MismatchError) as caught:
        load_teacher(TeacherSpec(file=str(path), arch=spec_arch, arch_args=spec_args), path,
                     input_shape=input_shape, num_classes=num_classes)
    return caught.value


def test_a_forgotten_dropout_in_the_issues_mlp_is_named_in_words(tmp_path: Path) -> None:
    # The issue's case: the teacher was trained as mlp(hidden=[1200, 1200], dropout=...) and named without it.
    error = _refused(tmp_path, ("mlp", {"hidden": [1200, 1200], "dropout": 0.3}, (1, 28, 28), 10),
                     "mlp", {"hidden": [1200, 1200]}, (1, 28, 28), 10)
    assert error.message.startswith("the teacher's file fits mlp(hidden=[1200, 1200], dropout=0.5): "
                                    "did you mean dropout?")
    assert "any rate above 0 loads this file" in error.message
    assert error.field == "teacher.arch_args"
    # The tensor names stay below, for whoever wants them, but after the sentence.
    assert error.message.index("In detail") > error.message.index("did you mean dropout")


def test_dropout_and_input_dropout_both_forgotten_are_both_named(tmp_path: Path) -> None:
    error = _refused(tmp_path, ("mlp", {"hidden": [16, 16], "dropout": 0.5, "input_dropout": 0.2}, (1, 4, 4), 3),
                     "mlp", {"hidden": [16, 16]}, (1, 4, 4), 3)
    assert "did you mean dropout and input_dropout?" in error.message


def test_a_dropout_the_file_does_not_have_is_named(tmp_path: Path) -> None:
    error = _refused(tmp_path, ("mlp", {"hidden": [16, 16]}, (1, 4, 4), 3),
                     "mlp", {"hidden": [16, 16], "dropout": 0.1}, (1, 4, 4), 3)
    assert "did you mean no dropout?" in error.message


def test_a_cnn_saved_without_batchnorm_is_named(tmp_path: Path) -> None:
    error = _refused(tmp_path, ("cnn", {"widths": [8], "batchnorm": False}, (1, 16, 16), 4),
                     "cnn", {"widths": [8]}, (1, 16, 16), 4)
    assert error.message.startswith("the teacher's file fits cnn(widths=[8], batchnorm=False): "
                                    "did you mean batchnorm: false?")


def test_a_deeper_hidden_list_is_counted(tmp_path: Path) -> None:
    error = _refused(tmp_path, ("mlp", {"hidden": [32, 32, 32]}, (1, 4, 4), 3), "mlp", {"hidden": [32, 32]},
                     (1, 4, 4), 3)
    assert error.message.startswith("the teacher's file has 1 more layer than mlp(hidden=[32, 32]) builds: "
                                    "did you mean hidden: [32, 32, 32]?")


def test_input_channels_are_said_in_words(tmp_path: Path) -> None:
    error = _refused(tmp_path, ("cnn", {"widths": [4]}, (3, 8, 8), 3), "cnn", {"widths": [4]}, (1, 8, 8), 3)
    assert error.message.startswith("the teacher expects 3 input channels, the data has 1")


def test_a_flattened_colour_teacher_on_grey_data_is_guessed(tmp_path: Path) -> None:
    error = _refused(tmp_path, ("mlp", {"hidden": [8]}, (3, 4, 4), 3), "mlp", {"hidden": [8]}, (1, 4, 4), 3)
    assert error.message.startswith("the teacher expects 48 input features, the data has 16 (3 times as many: "
                                    "a teacher for 3-channel images on 1-channel data?)")


def test_outputs_against_classes_are_said_in_words(tmp_path: Path) -> None:
    error = _refused(tmp_path, ("mlp", {"hidden": [8]}, (1, 4, 4), 10), "mlp", {"hidden": [8]}, (1, 4, 4), 6)
    assert error.message.startswith("the teacher has 10 outputs, the data 6 classes")


def test_a_resnet18_saved_for_grey_images_on_colour_data_says_so(tmp_path: Path) -> None:
    # The registry wraps torchvision models for 1-channel data (`net.` + the names); on RGB data none is built.
    error = _refused(tmp_path, ("resnet18", {}, (1, 32, 32), 4), "resnet18", {}, (3, 32, 32), 4)
    assert error.message.startswith("the teacher was saved from resnet18() built for 1- or 4-channel images")
    assert "but the data has 3 channels" in error.message


def test_other_widths_of_a_non_sequential_model_name_the_first_layer(tmp_path: Path) -> None:
    # safetensors sorts names (head before stem): the layers are put back in the model's order first.
    error = _refused(tmp_path, ("resnet_small", {"width": 8}, (3, 16, 16), 4), "resnet_small", {"width": 16},
                     (3, 16, 16), 4)
    assert error.message.startswith("the teacher's layers have other widths than resnet_small(width=16) builds")
    assert "the first, stem.0, has 8 outputs in the file, 16 built" in error.message
    assert "outputs, the data" not in error.message.split("In detail")[0]  # the head's 4 outputs do match
