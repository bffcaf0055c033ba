"""Text jobs through the API: hf teacher and text data uploads are sniffed, submissions resolved and checked."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.api.conftest import Account
from tests.text_models import make_bert_zip, sentences, write_jsonl


@pytest.fixture(scope="module")
def text_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("text_api")
    return {
        "base": make_bert_zip(tmp, "base"),
        "classifier": make_bert_zip(tmp, "classifier", labels=["negative", "positive"]),
        "train": write_jsonl(tmp / "train.jsonl", sentences(60, seed=1)),
        "csv": _csv(tmp / "train.csv"),
        "other_labels": write_jsonl(tmp / "other.jsonl", [(text, "meh") for text, _ in sentences(10, seed=3)]),
    }


def _csv(path: Path) -> Path:
    rows = sentences(20, seed=2)
    path.write_text("sentence,sentiment\n" + "".join(f'"{text}",{label}\n' for text, label in rows))
    return path


def _upload(client: TestClient, account: Account, path: Path, purpose: str) -> dict[str, Any]:
    response = client.post("/v1/files", headers=account.headers, files={"file": (path.name, path.read_bytes())},
                           data={"purpose": purpose})
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def _submit(client: TestClient, account: Account, spec: dict[str, Any]) -> Any:
    return client.post("/v1/jobs", headers=account.headers, json=spec)


def test_hf_teacher_upload_records_its_config(client: TestClient, alice: Account, text_files: dict[str, Path]) -> None:
    info = _upload(client, alice, text_files["classifier"], "teacher")["info"]
    assert info["format"] == "hf" and info["output_size"] == 2
    hf = info["hf"]
    assert hf["model_type"] == "bert" and hf["num_layers"] == 2 and hf["hidden_size"] == 32
    assert hf["labels"] == ["negative", "positive"] and hf["task"] == "text_classification" and hf["params"] > 0


def test_text_dataset_upload_lists_columns_and_labels(client: TestClient, alice: Account,
                                                      text_files: dict[str, Path]) -> None:
    info = _upload(client, alice, text_files["csv"], "dataset")["info"]
    assert info["kind"] == "text" and info["format"] == "csv" and info["num_rows"] == 20
    assert info["columns"] == ["sentence", "sentiment"]
    assert set(info["value_counts"]["sentiment"]) == {"negative", "positive"}


def test_text_job_is_resolved_to_the_text_task_and_its_defaults(client: TestClient, alice: Account,
                                                                 text_files: dict[str, Path]) -> None:
    teacher = _upload(client, alice, text_files["base"], "teacher")
    train = _upload(client, alice, text_files["train"], "dataset")
    response = _submit(client, alice, {"teacher": {"file": teacher["id"]}, "data": {"train": train["id"]},
                                       "stages": {"teacher_finetune_epochs": 1},
                                       "student": {"arch_args": {"num_hidden_layers": 1}}})
    assert response.status_code == 201, response.text
    spec = response.json()["spec"]
    assert spec["task"] == "text_classification" and spec["student"]["arch"] == "hf"
    assert spec["student"]["init_from_teacher"] is True and spec["export"] == ["hf", "safetensors", "onnx"]
    assert spec["optim"]["lr"] == 5e-5 and spec["batch_size"] == 32


@pytest.mark.parametrize(("patch", "field", "words"), [
    ({"data": {"text_field": "txt"}}, "data.text_field", "did you mean 'text'"),
    ({"data": {"label_field": "labels"}}, "data.label_field", "did you mean 'label'"),
    ({"stages": {"teacher_finetune_epochs": 0}}, "stages.teacher_finetune_epochs", "without a classification head"),
    ({"student": {"arch": "mlp"}}, "student.arch", "not a text_classification architecture"),
    ({"export": ["torchscript"]}, "export", "not torchscript"),
    ({"task": "image_classification"}, "task", "teacher file is Hugging Face"),
])
def test_bad_text_submissions_name_the_field(client: TestClient, alice: Account, text_files: dict[str, Path],
                                             patch: dict[str, Any], field: str, words: str) -> None:
    teacher = _upload(client, alice, text_files["base"], "teacher")
    train = _upload(client, alice, text_files["train"], "dataset")
    spec: dict[str, Any] = {"teacher": {"file": teacher["id"]}, "data": {"train": train["id"]},
                            "stages": {"teacher_finetune_epochs": 1}}
    for key, value in patch.items():
        spec[key] = {**spec[key], **value} if isinstance(value, dict) and key in spec else value
    response = _submit(client, alice, spec)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["field"] == field and words in error["message"], error


def test_labels_the_teacher_does_not_know_are_refused(client: TestClient, alice: Account,
                                                      text_files: dict[str, Path]) -> None:
    teacher = _upload(client, alice, text_files["classifier"], "teacher")
    train = _upload(client, alice, text_files["other_labels"], "dataset")
    response = _submit(client, alice, {"teacher": {"file": teacher["id"]}, "data": {"train": train["id"]}})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["field"] == "data.label_field" and "meh" in error["message"] and "negative" in error["message"]


def test_text_data_for_an_image_teacher_is_refused(client: TestClient, alice: Account,
                                                   text_files: dict[str, Path]) -> None:
    from tests.api import factories

    teacher = client.post("/v1/files", headers=alice.headers, files={"file": ("t.st", factories.safetensors_bytes())},
                          data={"purpose": "teacher"}).json()
    train = _upload(client, alice, text_files["train"], "dataset")
    response = _submit(client, alice, {"teacher": {"file": teacher["id"], "arch": "mlp", "arch_args": {"hidden": [32]}},
                                       "data": {"train": train["id"]}})
    assert response.status_code == 422
    assert response.json()["error"]["field"] == "data.train" and "text rows" in response.json()["error"]["message"]


def test_architectures_list_the_text_students(client: TestClient, alice: Account) -> None:
    entries = {entry["name"]: entry for entry in client.get("/v1/architectures", headers=alice.headers).json()}
    assert entries["hf"]["task"] == "text_classification" and "num_hidden_layers" in entries["hf"]["defaults"]
    assert entries["text_bilstm"]["task"] == "text_classification"
    assert entries["mlp"]["task"] == "image_classification"


def test_giant_hf_student_is_refused_at_submission(client: TestClient, alice: Account,
                                                   text_files: dict[str, Path]) -> None:
    # 128 layers of width 16384: at least 2 x 16384² parameters a layer in attention alone (about 7e10),
    # known from the teacher's sniffed config without building anything.
    teacher = _upload(client, alice, text_files["classifier"], "teacher")
    train = _upload(client, alice, text_files["train"], "dataset")
    giant = {"num_hidden_layers": 128, "hidden_size": 16384, "num_attention_heads": 256}
    response = _submit(client, alice, {"teacher": {"file": teacher["id"]}, "data": {"train": train["id"]},
                                       "student": {"arch_args": giant}})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert (error["code"], error["field"]) == ("resource_limit", "student.arch_args")
    assert "200,000,000" in error["message"] and "DISTILLERY_MAX_MODEL_PARAMETERS" in error["message"]
    # A student of the teacher's own size is not refused by the floor.
    small = _submit(client, alice, {"teacher": {"file": teacher["id"]}, "data": {"train": train["id"]},
                                    "student": {"arch_args": {"num_hidden_layers": 1}}})
    assert small.status_code == 201, small.text
