"""Causal-LM jobs through the API: hf causal LM and LM data uploads sniffed, submissions resolved and checked."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.api.conftest import Account
from tests.lm_models import make_lm_zip, sentences, write_chat_jsonl, write_completion_jsonl, write_text_jsonl


@pytest.fixture(scope="module")
def lm_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("lm_api")
    texts = sentences(40, seed=1)
    story = tmp / "story.txt"
    story.write_text("\n".join(texts) + "\n")
    commas = tmp / "commas.txt"
    commas.write_text("one, two, three\nfour, five\n")
    mixed = tmp / "mixed.jsonl"
    mixed.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n" + json.dumps({"prompt": "c"}) + "\n")
    return {
        "teacher": make_lm_zip(tmp, "teacher", layers=2, hidden=32),
        "llama": make_lm_zip(tmp, "llama", family="llama", layers=1, hidden=32),
        "other_tokenizer": make_lm_zip(tmp, "other", layers=1, hidden=32,
                                       tokenizer_corpus=["zebra quartz jumps over " * 3] * 50),
        "story": story,
        "commas": commas,
        "text_jsonl": write_text_jsonl(tmp / "text.jsonl", texts),
        "completions": write_completion_jsonl(tmp / "completions.jsonl", texts),
        "prompts": write_completion_jsonl(tmp / "prompts.jsonl", texts, with_completion=False),
        "chats": write_chat_jsonl(tmp / "chats.jsonl", texts),
        "mixed": mixed,
    }


def _upload(client: TestClient, account: Account, path: Path, purpose: str) -> dict[str, Any]:
    response = client.post("/v1/files", headers=account.headers, files={"file": (path.name, path.read_bytes())},
                           data={"purpose": purpose})
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def _submit(client: TestClient, account: Account, spec: dict[str, Any]) -> Any:
    return client.post("/v1/jobs", headers=account.headers, json=spec)


def _spec(teacher: dict[str, Any], train: dict[str, Any], **extra: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {"teacher": {"file": teacher["id"]}, "data": {"train": train["id"]},
                            "student": {"arch_args": {"num_hidden_layers": 1}}}
    for key, value in extra.items():
        spec[key] = {**spec.get(key, {}), **value} if isinstance(value, dict) else value
    return spec


def test_causal_lm_teacher_upload_records_its_config(client: TestClient, alice: Account,
                                                     lm_files: dict[str, Path]) -> None:
    info = _upload(client, alice, lm_files["teacher"], "teacher")["info"]
    hf = info["hf"]
    assert info["format"] == "hf" and hf["task"] == "causal_lm" and hf["model_type"] == "gpt2"
    assert hf["num_layers"] == 2 and hf["hidden_size"] == 32 and hf["vocab_size"] > 300
    assert hf["tokenizer_size"] == hf["vocab_size"] and len(hf["vocab_sha256"]) == 64
    llama = _upload(client, alice, lm_files["llama"], "teacher")["info"]["hf"]
    assert llama["task"] == "causal_lm" and llama["model_type"] == "llama" and llama["num_layers"] == 1
    # The same tokenizer (trained on the same corpus) gives the same fingerprint across families.
    assert llama["vocab_sha256"] == hf["vocab_sha256"]


@pytest.mark.parametrize(("name", "fmt", "kind"), [
    ("story", "txt", "text"), ("commas", "txt", "text"), ("text_jsonl", "jsonl", "text"),
    ("completions", "jsonl", "completion"), ("prompts", "jsonl", "prompt"), ("chats", "jsonl", "chat"),
])
def test_lm_data_uploads_are_datasets_of_their_kind(client: TestClient, alice: Account, lm_files: dict[str, Path],
                                                    name: str, fmt: str, kind: str) -> None:
    info = _upload(client, alice, lm_files[name], "dataset")["info"]
    assert (info["kind"], info["format"], info["lm_kind"]) == ("text", fmt, kind)
    assert info["num_rows"] == (2 if name == "commas" else 40)


def test_empty_or_binary_txt_is_refused(client: TestClient, alice: Account, tmp_path: Path) -> None:
    for content, words in ((b"\n\n  \n", "empty"), (b"abc\xff\xfe\x00", "UTF-8")):
        response = client.post("/v1/files", headers=alice.headers, files={"file": ("x.txt", content)},
                               data={"purpose": "dataset"})
        assert response.status_code == 422, response.text
        assert response.json()["error"]["field"] == "file" and words in response.json()["error"]["message"]


def test_causal_lm_job_is_resolved_to_its_task_and_defaults(client: TestClient, alice: Account,
                                                            lm_files: dict[str, Path]) -> None:
    teacher = _upload(client, alice, lm_files["teacher"], "teacher")
    train = _upload(client, alice, lm_files["story"], "dataset")
    response = _submit(client, alice, _spec(teacher, train, method={"top_k": 8, "divergence": "reverse_kl"}))
    assert response.status_code == 201, response.text
    spec = response.json()["spec"]
    assert spec["task"] == "causal_lm" and spec["student"]["arch"] == "hf" and spec["method"]["top_k"] == 8
    assert spec["method"]["divergence"] == "reverse_kl" and spec["method"]["temperature"] == 1.0
    assert spec["data"]["max_length"] == 256 and spec["export"] == ["hf", "safetensors"]


@pytest.mark.parametrize(("data", "extra", "field", "code", "words"), [
    ("prompts", {}, "method.name", "invalid_spec", "prompts without completions"),
    ("story", {"method": {"name": "seq_kd"}}, "method.name", "invalid_spec", "plain text"),
    ("chats", {"method": {"name": "seq_kd"}}, "method.name", "invalid_spec", "chats"),
    ("prompts", {"method": {"name": "seq_kd"}, "stages": {"teacher_finetune_epochs": 1}},
     "stages.teacher_finetune_epochs", "invalid_spec", "no answers"),
    ("completions", {"data": {"prompt_field": "promt", "messages_field": "msgs", "text_field": "txt"}},
     "data.text_field", "invalid_spec", "did you mean 'prompt'"),
    ("mixed", {}, "data.completion_field", "bad_file", "row 2 has no 'completion'"),
    ("story", {"data": {"label_field": "y"}}, "data.label_field", "invalid_spec", "causal_lm does not take"),
    ("story", {"student": {"arch": "mlp", "arch_args": {}}}, "student.arch", "invalid_spec", "not a causal_lm student"),
    ("story", {"method": {"top_k": 4, "name": "seq_kd"}}, "method.top_k", "invalid_spec", "leave top_k at 0"),
])
def test_bad_causal_lm_submissions_name_the_field(client: TestClient, alice: Account, lm_files: dict[str, Path],
                                                  data: str, extra: dict[str, Any], field: str, code: str,
                                                  words: str) -> None:
    teacher = _upload(client, alice, lm_files["teacher"], "teacher")
    train = _upload(client, alice, lm_files[data], "dataset")
    response = _submit(client, alice, _spec(teacher, train, **extra))
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert (error["field"], error["code"]) == (field, code) and words in error["message"], error


def test_seq_kd_takes_prompts_alone(client: TestClient, alice: Account, lm_files: dict[str, Path]) -> None:
    teacher = _upload(client, alice, lm_files["teacher"], "teacher")
    train = _upload(client, alice, lm_files["prompts"], "dataset")
    response = _submit(client, alice, _spec(teacher, train, method={"name": "seq_kd", "max_new_tokens": 8}))
    assert response.status_code == 201, response.text


def test_lm_data_for_other_teachers_is_refused(client: TestClient, alice: Account, lm_files: dict[str, Path],
                                               tmp_path: Path) -> None:
    from tests.text_models import make_bert_zip

    bert = _upload(client, alice, make_bert_zip(tmp_path, "bert", labels=["a", "b"]), "teacher")
    story = _upload(client, alice, lm_files["story"], "dataset")
    response = _submit(client, alice, {"teacher": {"file": bert["id"]}, "data": {"train": story["id"]}})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["field"] == "data.train" and "plain text" in error["message"]
    # And an LM teacher given image data is told what LM data is.
    from tests.api import factories

    npz = client.post("/v1/files", headers=alice.headers, files={"file": ("d.npz", factories.npz_bytes())},
                      data={"purpose": "dataset"}).json()
    teacher = _upload(client, alice, lm_files["teacher"], "teacher")
    response = _submit(client, alice, _spec(teacher, npz))
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["field"] == "data.train" and ".txt file or .jsonl rows" in error["message"]


def test_pretrained_student_of_another_tokenizer_is_refused(client: TestClient, alice: Account,
                                                            lm_files: dict[str, Path]) -> None:
    teacher = _upload(client, alice, lm_files["teacher"], "teacher")
    train = _upload(client, alice, lm_files["story"], "dataset")
    other = _upload(client, alice, lm_files["other_tokenizer"], "teacher")
    response = _submit(client, alice, {"teacher": {"file": teacher["id"]}, "data": {"train": train["id"]},
                                       "student": {"file": other["id"]}})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert (error["code"], error["field"]) == ("tokenizer_mismatch", "student.file")
    assert "differs from the teacher's" in error["message"]
    same = _upload(client, alice, lm_files["llama"], "teacher")
    response = _submit(client, alice, {"teacher": {"file": teacher["id"]}, "data": {"train": train["id"]},
                                       "student": {"file": same["id"]}})
    assert response.status_code == 201, response.text


def test_over_the_memory_limit_is_refused_with_the_estimate(client: TestClient, alice: Account,
                                                           lm_files: dict[str, Path]) -> None:
    teacher = _upload(client, alice, lm_files["teacher"], "teacher")
    train = _upload(client, alice, lm_files["story"], "dataset")
    # 4096 sequences of 4096 tokens: the activations alone are far over the default 12 GiB.
    response = _submit(client, alice, _spec(teacher, train, batch_size=4096, data={"max_length": 4096}))
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert (error["code"], error["field"]) == ("resource_limit", "batch_size")
    assert "estimate: teacher" in error["message"] and "activation" in error["message"]
    assert "DISTILLERY_MAX_TRAIN_MEMORY_BYTES" in error["message"]


def test_architectures_list_hf_for_causal_lm(client: TestClient, alice: Account) -> None:
    entries = {entry["name"]: entry for entry in client.get("/v1/architectures", headers=alice.headers).json()}
    assert entries["hf"]["tasks"] == ["text_classification", "causal_lm"]
    assert entries["mlp"]["tasks"] == ["image_classification"]
