"""The checks before training: the teacher near chance fails fast and says what would fix it; inputs swapped."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from kdcore.errors import KDError
from kdcore.pipeline import JobInputs, RunOptions, run_job
from kdcore.spec import JobSpec, parse_spec
from kdcore.teacher_check import best_label_mapping
from tests.kdcore.helpers import make_blob_images, save_safetensors_teacher, train_teacher

TEACHER_ARGS = {"hidden": [32]}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("teacher_check")
    data = make_blob_images(root / "blobs.npz", num_train=400, num_test=100)
    save_safetensors_teacher(train_teacher("mlp", TEACHER_ARGS, data), root / "teacher.safetensors")
    # The same images with the labels renamed: class c is called (c + 1) % 4.
    with np.load(data) as arrays:
        renamed = {key: (arrays[key] + 1) % 4 if key.startswith("y") else arrays[key] for key in arrays.files}
    np.savez(root / "renamed.npz", **renamed)
    return root


def _spec(workdir: Path, train: str = "blobs.npz", **stages: object) -> JobSpec:
    return parse_spec({
        "teacher": {"file": str(workdir / "teacher.safetensors"), "arch": "mlp", "arch_args": TEACHER_ARGS},
        "student": {"arch": "mlp", "arch_args": {"hidden": [8]}},
        "data": {"train": str(workdir / train), "val_fraction": 0.2},
        "stages": {"distill_epochs": 1, "baseline": False, **stages},
        "batch_size": 64, "export": [], "threads": 1,
    })


def _run(spec: JobSpec, out: Path):
    inputs = JobInputs(teacher=Path(spec.teacher.file), train=Path(spec.data.train))
    return run_job(spec, inputs, RunOptions(out_dir=out, latency_runs=2))


def _wrong_normalization(spec: JobSpec) -> JobSpec:
    # The teacher saw pixels in [0, 1]; this shifts them all by -2 (the blobs shrug off milder mistakes).
    spec.data.normalize.mean, spec.data.normalize.std = [2.0], [1.0]
    return spec


def test_wrong_normalisation_fails_before_training_and_names_the_fix(workdir: Path, tmp_path: Path) -> None:
    with pytest.raises(KDError) as caught:
        _run(_wrong_normalization(_spec(workdir)), tmp_path)
    error = caught.value
    assert error.code == "teacher_check_failed" and error.field == "data.normalize"
    assert "before any training, near chance" in error.message
    assert "with no normalisation (mean 0, std 1) it scores 100.0%" in error.message
    assert "Set data.normalize to mean [" in error.message
    assert "stages.teacher_check: warn" in error.message
    assert not (tmp_path / "history.csv").exists()  # nothing was trained


def test_warn_runs_the_job_and_reports_the_check(workdir: Path, tmp_path: Path) -> None:
    result = _run(_wrong_normalization(_spec(workdir, teacher_check="warn")), tmp_path)
    check = result.metrics["teacher_check"]
    assert not check["passed"] and check["accuracy"] < check["threshold"]
    fixes = {t["what"]: t["accuracy"] for t in check["tried"]}
    assert fixes["no normalisation (mean 0, std 1)"] > 0.9
    assert any("near chance" in warning for warning in result.metrics["warnings"])
    assert "near chance" in (tmp_path / "report.md").read_text()
    assert json.loads((tmp_path / "metrics.json").read_text())["teacher_check"]["passed"] is False


def test_a_good_teacher_passes_and_its_score_is_kept(workdir: Path, tmp_path: Path) -> None:
    result = _run(_spec(workdir), tmp_path)
    check = result.metrics["teacher_check"]
    assert check["passed"] and check["accuracy"] > 0.9 and check["split"] == "validation split"
    assert check["tried"] == []  # nothing to explain
    assert "warnings" not in result.metrics or not any("near chance" in w for w in result.metrics["warnings"])


def test_labels_in_another_order_are_recognised(workdir: Path, tmp_path: Path) -> None:
    with pytest.raises(KDError) as caught:
        _run(_spec(workdir, train="renamed.npz"), tmp_path)
    assert caught.value.field == "data.train"
    assert "another label order" in caught.value.message
    assert "0->1, 1->2, 2->3, 3->0" in caught.value.message


def test_off_skips_the_check(workdir: Path, tmp_path: Path) -> None:
    result = _run(_wrong_normalization(_spec(workdir, teacher_check="off")), tmp_path)
    assert "teacher_check" not in result.metrics


def test_best_label_mapping_undoes_a_permutation() -> None:
    permutation = [2, 0, 3, 1]  # data class t is predicted as permutation[t]
    confusion = [[0] * 4 for _ in range(4)]
    for true, predicted in enumerate(permutation):
        confusion[true][predicted] = 10
        confusion[true][true] += 1  # a little mass on the diagonal must not win
    mapping, correct = best_label_mapping(confusion)
    assert [mapping[p] for p in permutation] == [0, 1, 2, 3] and correct == 40


class _BrightestChannel(torch.nn.Module):
    """A teacher that answers 'the brightest colour channel': class 0 red, 1 green, 2 blue."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3)) * 10


def test_swapped_colour_channels_are_recognised() -> None:
    from kdcore.data import Preprocess
    from kdcore.runtime import Runtime
    from kdcore.teacher_check import check_message, check_teacher_accuracy

    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (300,), generator=generator)
    images = torch.randint(0, 60, (300, 3, 4, 4), dtype=torch.uint8, generator=generator)
    images[torch.arange(300), labels] += 150
    bgr = images.flip(1)  # the data in the other channel order than the teacher's
    result = check_teacher_accuracy(
        _BrightestChannel(), x=bgr, y=labels, train_x=bgr, split="validation split",
        preprocess=Preprocess([0.0], [1.0], (3, 4, 4)), num_classes=3,
        runtime=Runtime(device=torch.device("cpu"), precision="fp32"), batch_size=128)
    assert not result["passed"]
    tried = {t["fix"]: t["accuracy"] for t in result["tried"]}
    assert tried["channels"] == 1.0
    assert "with the colour channels reversed (RGB <-> BGR) it scores 100.0%" in check_message(result)


def test_the_teacher_given_as_training_data_is_named_as_such(workdir: Path, tmp_path: Path) -> None:
    spec = _spec(workdir)
    spec.data.train = spec.teacher.file
    with pytest.raises(KDError, match="this looks like a teacher model") as caught:
        _run(spec, tmp_path)
    assert caught.value.field == "data.train"


def test_a_tuned_job_checks_the_teacher_once_before_its_trials(workdir: Path, tmp_path: Path) -> None:
    from kdcore.pipeline import prepare_teacher_cache

    spec = _wrong_normalization(_spec(workdir))
    inputs = JobInputs(teacher=Path(spec.teacher.file), train=Path(spec.data.train))
    with pytest.raises(KDError) as caught:
        prepare_teacher_cache(spec, inputs, RunOptions(out_dir=tmp_path, teacher_cache=tmp_path / "cache.pt"))
    assert caught.value.code == "teacher_check_failed"
    assert not (tmp_path / "cache.pt").exists()
