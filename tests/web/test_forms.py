"""The new-job form: generated from the spec's schema, converted to a spec, errors mapped to their controls."""

from __future__ import annotations

from typing import Any

from starlette.datastructures import FormData

from api.web.forms import FormValues, spec_form
from kdcore.spec import JobSpec


def _filled(**changes: Any) -> FormValues:
    values = spec_form().defaults()
    values.update({
        "teacher.file": "file_teacher",
        "data.train": "file_train",
        "teacher.arch": "mlp",
        "teacher.args.mlp.hidden": "64, 64",
        "student.args.mlp.hidden": "16",
    })
    values.update(changes)
    return values


def test_form_covers_every_spec_field() -> None:
    form = spec_form()
    paths = {f.path for f in form.fields}

    def leaves(model: type, prefix: str = "") -> set[str]:
        found = set()
        for name, info in model.model_fields.items():  # type: ignore[attr-defined]
            annotation = info.annotation
            if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
                found |= leaves(annotation, f"{prefix}{name}.")
            elif not name.endswith("arch_args"):
                found.add(f"{prefix}{name}")
        return found

    # `tune` is offered as one search (find T and alpha, with a trial count), not field by field.
    assert leaves(JobSpec) - {"tune"} <= paths and {"tune.find", "tune.trials"} <= paths
    assert all(f.help for f in form.fields), [f.name for f in form.fields if not f.help]


def test_find_t_and_alpha_makes_a_tune_block_with_the_trial_count() -> None:
    checked = spec_form().validate(_filled(**{"tune.find": True, "tune.trials": "6"}))
    assert checked.ok, (checked.errors, checked.general)
    assert checked.spec is not None and checked.spec.tune is not None
    assert checked.spec.tune.trials == 6
    assert set(checked.spec.tune.space) == {"method.temperature", "method.alpha"}
    assert spec_form().validate(_filled()).spec.tune is None  # type: ignore[union-attr]
    refused = spec_form().validate(_filled(**{"tune.find": True, "tune.trials": "0"}))
    assert "tune.trials" in refused.errors


def test_defaults_come_from_the_spec() -> None:
    values = spec_form().defaults()
    assert values["method.temperature"] == "4.0"
    assert values["method.alpha"] == "0.9"
    assert values["stages.distill_epochs"] == "10"
    assert values["export"] == ["safetensors", "torchscript", "onnx"]
    assert values["student.arch"] == "mlp"
    assert values["student.args.mlp.hidden"] == "800, 800"


def test_filled_form_makes_a_valid_spec() -> None:
    checked = spec_form().validate(_filled(**{"stages.baseline": True, "export": ["onnx"], "batch_size": "32"}))
    assert checked.ok, (checked.errors, checked.general)
    assert checked.spec is not None
    assert checked.spec.teacher.arch_args == {"hidden": [64, 64], "dropout": 0.0, "input_dropout": 0.0,
                                              "activation": "relu", "batchnorm": False}
    assert checked.spec.student.arch_args["hidden"] == [16]
    assert checked.spec.stages.baseline is True
    assert checked.spec.export == ["onnx"]
    assert checked.spec.batch_size == 32
    assert checked.spec.data.test is None


def test_errors_name_the_control_they_concern() -> None:
    checked = spec_form().validate(_filled(**{
        "method.temperature": "-1",
        "batch_size": "0",
        "student.args.mlp.hidden": "16, x",
        "optim.lr": "fast",
        "data.train": "",
    }))
    assert not checked.ok
    assert set(checked.errors) == {"method.temperature", "batch_size", "student.args.mlp.hidden", "optim.lr",
                                   "data.train"}
    assert "greater than 0" in checked.errors["method.temperature"][0]
    assert checked.errors["student.args.mlp.hidden"][0].startswith("item 2:")
    assert "upload" in checked.errors["data.train"][0]
    assert checked.general == []


def test_stage_rule_lands_on_finetune_epochs() -> None:
    checked = spec_form().validate(_filled(**{"stages.distill_epochs": "0", "stages.finetune_epochs": "0"}))
    assert "at least one training stage" in checked.errors["stages.finetune_epochs"][0]


def test_arguments_of_other_architectures_are_ignored_but_kept() -> None:
    form = spec_form()
    values = _filled(**{"student.arch": "cnn", "student.args.mlp.hidden": "not, numbers"})
    checked = form.validate(values)
    assert checked.ok, checked.errors
    assert checked.spec is not None and checked.spec.student.arch == "cnn"
    assert "hidden" in checked.spec.student.arch_args and checked.spec.student.arch_args["hidden"] == 128
    assert values["student.args.mlp.hidden"] == "not, numbers"  # still there when the user switches back


def test_values_from_form_keep_what_was_typed() -> None:
    form = spec_form()
    submitted = FormData([("method.temperature", " -1 "), ("stages.baseline", "true"), ("export", "onnx"),
                          ("student.args.mlp.hidden", "16, x")])
    values = form.values_from_form(submitted)
    assert values["method.temperature"] == "-1"
    assert values["stages.baseline"] is True
    assert values["student.init_from_teacher"] is False
    assert values["export"] == ["onnx"]
    assert values["student.args.mlp.hidden"] == "16, x"


def test_prefill_from_a_spec_round_trips() -> None:
    form = spec_form()
    original = form.validate(_filled(**{"method.temperature": "2.5", "optim.name": "sgd", "seed": "7",
                                        "data.normalize.mean": "0.5, 0.4", "data.normalize.std": "0.2, 0.3"}))
    assert original.spec is not None
    values = form.values_from_spec(original.spec.model_dump(mode="json"))
    assert values["method.temperature"] == "2.5"
    assert values["data.normalize.mean"] == "0.5, 0.4"
    assert values["teacher.args.mlp.hidden"] == "64, 64"
    again = form.validate(values)
    assert again.spec == original.spec


def test_nullable_fields_empty_mean_none() -> None:
    checked = spec_form().validate(_filled(**{"optim.grad_clip": "", "threads": "", "name": ""}))
    assert checked.spec is not None
    assert checked.spec.optim.grad_clip is None and checked.spec.threads is None and checked.spec.name is None


def test_advanced_toggles_read_as_english() -> None:
    summaries = {group.title: group.summary for group in spec_form().groups if group.advanced}
    assert summaries["Data"] == "More data settings"
    assert summaries["Stages"] == "More stages settings"
    for title, summary in summaries.items():
        words = summary.lower().split()
        assert len(words) == len(set(words)), f"{title}: {summary!r} repeats a word"
    other = next(group for group in spec_form().groups if not group.fields)
    assert other.summary == f"Show {len(other.advanced)} settings"
