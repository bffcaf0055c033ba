import json
from pathlib import Path

import pytest
import torch

from kdcore.architectures import list_architectures
from kdcore.errors import KDError, SpecError
from kdcore.models import build_model
from kdcore.runtime import cpu_has_native_bf16, make_runtime
from kdcore.spec import for_task, load_spec, parse_spec, resolve_local_paths

MINIMAL = {"teacher": {"file": "t.onnx"}, "data": {"train": "d.npz"}}


def _errors(raw: dict) -> list[dict[str, str]]:
    with pytest.raises(SpecError) as caught:
        parse_spec(raw)
    return caught.value.errors


def test_parse_spec_fills_documented_defaults() -> None:
    spec = parse_spec(MINIMAL)
    assert spec.method.temperature == 4.0 and spec.method.alpha == 0.9
    assert spec.stages.distill_epochs == 10 and spec.stages.baseline
    assert spec.stages.teacher_check == "fail" and spec.stages.select == "best_val"
    assert spec.export == ["safetensors", "torchscript", "onnx"]
    assert spec.student.arch is None and spec.data.augment == "none"  # the task's default, filled by for_task
    assert for_task(spec, "image_classification").student.arch == "mlp"


@pytest.mark.parametrize(("patch", "field", "words"), [
    ({"method": {"temperature": 0}}, "method.temperature", "greater than 0"),
    ({"method": {"temperature": -2}}, "method.temperature", "greater than 0"),
    ({"method": {"alpha": 1.5}}, "method.alpha", "less than or equal to 1"),
    ({"method": {"alpha": -0.1}}, "method.alpha", "greater than or equal to 0"),
    ({"method": {"name": "fitnets"}}, "method.name", "'kd'"),
    ({"stages": {"distill_epochs": -1}}, "stages.distill_epochs", "greater than or equal to 0"),
    ({"stages": {"distill_epochs": 0}}, "stages.finetune_epochs", "at least one training stage"),
    ({"student": {"arch": "transformer9000"}}, "student.arch", "unknown architecture"),
    ({"student": {"arch": "mlp", "arch_args": {"hiden": [3]}}}, "student.arch_args", "hiden"),
    ({"student": {"arch": "mlp", "arch_args": {"hidden": [0]}}}, "student.arch_args", "between 1 and 65536"),
    ({"teacher": {"file": "t.st", "format": "safetensors"}}, "teacher.arch", "registry architecture"),
    ({"teacher": {"file": "t", "format": "keras"}}, "teacher.format", "safetensors"),
    ({"data": {"train": "d.npz", "val_fraction": 1.0}}, "data.val_fraction", "less than 1"),
    ({"data": {"train": "d.npz", "normalize": {"std": [0.0]}}}, "data.normalize.std", "> 0"),
    ({"data": {"train": "d.npz", "augment": "mixup"}}, "data.augment", "'none'"),
    ({"data": {"train": "d.npz", "mixup": -0.5}}, "data.mixup", "greater than or equal to 0"),
    ({"device": "tpu"}, "device", "auto, cpu, cuda"),
    ({"precision": "int4"}, "precision", "'fp32'"),
    ({"export": ["tflite"]}, "export.0", "'safetensors'"),
    ({"batch_size": 0}, "batch_size", "greater than or equal to 1"),
    ({"temprature": 3}, "temprature", "Extra inputs"),
])
def test_parse_spec_names_the_bad_field(patch: dict, field: str, words: str) -> None:
    errors = _errors({**MINIMAL, **patch})
    matching = [e for e in errors if e["field"] == field]
    assert matching, errors
    assert words in matching[0]["message"]


def test_parse_spec_missing_teacher_is_named() -> None:
    assert _errors({"data": {"train": "d.npz"}})[0]["field"] == "teacher"


def test_load_spec_reads_yaml_and_json(tmp_path: Path) -> None:
    (tmp_path / "job.yaml").write_text("teacher: {file: t.onnx}\ndata: {train: d.npz}\nmethod: {temperature: 2}\n")
    (tmp_path / "job.json").write_text(json.dumps({**MINIMAL, "seed": 7}))
    assert load_spec(tmp_path / "job.yaml").method.temperature == 2
    assert load_spec(tmp_path / "job.json").seed == 7


def test_load_spec_reports_syntax_errors_and_missing_files(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("teacher: [unclosed\n")
    with pytest.raises(SpecError, match="not valid yaml"):
        load_spec(tmp_path / "bad.yaml")
    with pytest.raises(SpecError, match="cannot read"):
        load_spec(tmp_path / "missing.yaml")


def test_resolve_local_paths_is_relative_to_the_spec(tmp_path: Path) -> None:
    spec = resolve_local_paths(parse_spec(MINIMAL), tmp_path)
    assert spec.teacher.file == str(tmp_path / "t.onnx")
    assert spec.data.train == str(tmp_path / "d.npz")


def test_list_architectures_serves_every_entry_with_arguments() -> None:
    entries = {entry.name: entry for entry in list_architectures()}
    assert {"mlp", "cnn", "resnet_small", "linear", "resnet18", "mobilenet_v3_small"} <= set(entries)
    assert "hidden" in entries["mlp"].args_schema["properties"]
    assert entries["mlp"].defaults["hidden"] == [800, 800]
    assert entries["resnet18"].family == "torchvision"


@pytest.mark.parametrize("arch", [entry.name for entry in list_architectures() if entry.task == "image_classification"])
def test_every_registry_architecture_builds_and_runs(arch: str) -> None:
    torch.set_num_threads(1)
    model = build_model(arch, {}, (3, 32, 32), 7).eval()
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 7)


def test_image_architecture_refuses_feature_vectors() -> None:
    with pytest.raises(KDError, match="image input"):
        build_model("cnn", {}, (20,), 3)


def test_cuda_device_without_gpu_is_a_clear_error() -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present here")
    with pytest.raises(KDError) as caught:
        make_runtime("cuda", "fp32")
    assert caught.value.field == "device"
    with pytest.raises(KDError, match="bf16"):
        make_runtime("cpu", "fp16")
    assert make_runtime("auto", "bf16").device.type == "cpu"


@pytest.mark.parametrize(("flags", "native"), [
    ("fpu sse2 avx2 fma avx512f avx512bw", False),  # AVX-512 alone converts bf16 in software
    ("fpu avx2 avx512f avx512_bf16", True),
    ("fpu avx2 amx_bf16 amx_tile", True),
    ("fpu sse2 avx avx2", False),
])
def test_native_bf16_is_read_off_the_cpu_flags(flags: str, native: bool) -> None:
    cpuinfo = f"processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: {flags}\n"
    assert cpu_has_native_bf16(cpuinfo) is native


def test_native_bf16_assumed_where_the_flags_cannot_be_read() -> None:
    assert cpu_has_native_bf16("processor\t: 0\n") is True  # no false alarm


@pytest.mark.parametrize(("size", "pool_size"), [(28, 4), (16, 4), (32, 4), (9, 3), (30, 2)])
def test_cnn_exports_to_onnx_at_any_input_size(tmp_path: Path, size: int, pool_size: int) -> None:
    from kdcore.export import export_onnx

    model = build_model("cnn", {"widths": [4, 8], "hidden": 16, "pool_size": pool_size}, (1, size, size), 10)
    assert export_onnx(model.eval(), tmp_path / "cnn.onnx", (1, size, size)).exists()


@pytest.mark.parametrize(("task", "raw"), [
    ("image_classification", {"teacher": {"file": "t"}, "student": {"arch": "mlp"}, "data": {"train": "d"}}),
    ("text_classification", {"teacher": {"file": "t"}, "data": {"train": "d"}}),
    ("causal_lm", {"teacher": {"file": "t"}, "data": {"train": "d"}}),
])
def test_a_stored_resolved_spec_resolves_again_to_itself(task: str, raw: dict[str, object]) -> None:
    # The service stores the resolved spec, every field named; the worker resolves it again.
    resolved = for_task(parse_spec(raw), task)
    assert for_task(parse_spec(resolved.model_dump(mode="json")), task) == resolved


@pytest.mark.parametrize(("patch", "field", "suggestion"), [
    ({"method": {"temprature": 2.0}}, "method.temprature", "did you mean 'temperature'?"),
    ({"stages": {"baseline": True, "selct": "last"}}, "stages.selct", "did you mean 'select'?"),
    ({"data": {"train": "d.npz", "normalise": {}}}, "data.normalise", "did you mean 'normalize'?"),
    ({"teacher": {"file": "t", "format": "onxx"}}, "teacher.format", "did you mean 'onnx'?"),
    ({"optim": {"schedule": "cosin"}}, "optim.schedule", "did you mean 'cosine'?"),
    ({"stages": {"select": "best"}}, "stages.select", "did you mean 'best_val'?"),
    ({"student": {"arch": "resnet_smal"}}, "student.arch", "did you mean 'resnet_small'"),
    ({"student": {"arch": "mlp", "arch_args": {"hiden": [3]}}}, "student.arch_args", "did you mean 'hidden'?"),
])
def test_typos_get_a_did_you_mean(patch: dict, field: str, suggestion: str) -> None:
    errors = _errors({**MINIMAL, **patch})
    assert [e["field"] for e in errors] == [field]
    assert suggestion in errors[0]["message"]


def test_no_suggestion_for_a_name_unlike_any_field() -> None:
    (error,) = _errors({**MINIMAL, "method": {"zzzzqqq": 1}})
    assert error["field"] == "method.zzzzqqq" and "did you mean" not in error["message"]
