"""Sniffing Hugging Face model folders uploaded as zips: what they hold, and what is refused before any load."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from kdcore.errors import BadInputError, KDError
from kdcore.hf_sniff import sniff_hf_zip
from kdcore.teacher_sniff import sniff_teacher
from tests.text_models import make_bert_folder, zip_folder

LABELS = ["positive", "negative", "neutral"]  # deliberately not sorted: id order must be kept


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import torch

    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("hf_sniff")
    return {
        "root": root,
        "base": make_bert_folder(root / "base", layers=2, hidden=32),
        "classifier": make_bert_folder(root / "classifier", layers=3, hidden=16, labels=LABELS),
    }


def _zip(folder: Path, path: Path, *, drop: tuple[str, ...] = (), replace: dict[str, bytes] | None = None,
         extra: dict[str, bytes] | None = None, compression: int = zipfile.ZIP_DEFLATED) -> Path:
    """The folder zipped with some files left out, some replaced and some added."""
    replace = replace or {}
    with zipfile.ZipFile(path, "w", compression=compression) as archive:
        for file in sorted(folder.iterdir()):
            if file.name in drop:
                continue
            if file.name in replace:
                archive.writestr(file.name, replace[file.name])
            else:
                archive.write(file, file.name)
        for name, data in (extra or {}).items():
            archive.writestr(name, data)
    return path


def _sniff(path: Path):
    with zipfile.ZipFile(path) as zf:
        return sniff_hf_zip(zf)


def _config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


# --- what a folder holds ------------------------------------------------------------------------------


def test_base_bert_zip_is_an_hf_text_classification_teacher(folders: dict[str, Path]) -> None:
    folder = folders["base"]
    path = zip_folder(folder, folders["root"] / "base.zip")

    info = sniff_teacher(path)

    assert info.format == "hf"
    assert info.output_size is None  # no head: the data decides the classes
    hf = info.hf
    assert hf is not None
    assert hf.task == "text_classification"
    assert hf.model_type == "bert"
    assert hf.num_layers == 2 and hf.hidden_size == 32
    assert hf.vocab_size == _config(folder)["vocab_size"]
    assert hf.labels is None and hf.has_classifier is False
    assert hf.root == ""
    assert hf.weight_files == ["model.safetensors"]
    assert "tokenizer.json" in hf.tokenizer_files


def test_params_are_the_saved_tensors_elements(folders: dict[str, Path]) -> None:
    from safetensors.torch import load_file
    from transformers import BertModel

    folder = folders["base"]
    hf = _sniff(zip_folder(folder, folders["root"] / "params.zip"))

    tensors = load_file(str(folder / "model.safetensors"))
    assert hf.params == sum(t.numel() for t in tensors.values())
    # and that is the model's own parameter count (BERT's base model ties nothing)
    model = BertModel.from_pretrained(str(folder), use_safetensors=True, local_files_only=True)
    assert hf.params == sum(p.numel() for p in model.parameters())


def test_classifier_zip_records_labels_in_id_order(folders: dict[str, Path]) -> None:
    info = sniff_teacher(zip_folder(folders["classifier"], folders["root"] / "classifier.zip"))

    assert info.format == "hf" and info.hf is not None
    assert info.hf.has_classifier is True
    assert info.hf.labels == LABELS
    assert info.output_size == len(LABELS)
    assert info.hf.num_layers == 3 and info.hf.hidden_size == 16


def test_labels_follow_ids_not_the_order_of_the_json(folders: dict[str, Path]) -> None:
    config = _config(folders["classifier"])
    # id2label written with its keys out of order: the ids decide
    config["id2label"] = {"2": "neutral", "0": "positive", "1": "negative"}
    path = _zip(folders["classifier"], folders["root"] / "shuffled.zip",
                replace={"config.json": json.dumps(config).encode()})
    assert _sniff(path).labels == LABELS


def test_folder_zipped_under_one_top_folder(folders: dict[str, Path]) -> None:
    path = zip_folder(folders["classifier"], folders["root"] / "nested.zip", top="my-model")

    info = sniff_teacher(path)

    assert info.format == "hf" and info.hf is not None
    assert info.hf.root == "my-model/"
    assert info.hf.labels == LABELS
    assert info.hf.weight_files == ["model.safetensors"]


def test_causal_lm_config_is_reported_as_causal_lm(folders: dict[str, Path]) -> None:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from kdcore.spec import parse_spec
    from kdcore.tasks import resolve_task

    folder = folders["root"] / "gpt2"
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=2, n_head=2)).save_pretrained(
        str(folder), safe_serialization=True)
    (folder / "tokenizer.json").write_bytes((folders["base"] / "tokenizer.json").read_bytes())
    assert _config(folder)["architectures"] == ["GPT2LMHeadModel"]
    path = zip_folder(folder, folders["root"] / "gpt2.zip")

    info = sniff_teacher(path)

    assert info.hf is not None
    assert info.hf.task == "causal_lm"
    assert info.hf.model_type == "gpt2"
    assert info.hf.num_layers == 2 and info.hf.hidden_size == 16
    spec = parse_spec({"teacher": {"file": str(path)}, "data": {"train": "train.jsonl"}})
    assert resolve_task(spec, info) == "causal_lm"
    text = parse_spec({"task": "text_classification", "teacher": {"file": str(path)}, "data": {"train": "t.jsonl"}})
    with pytest.raises(KDError) as caught:
        resolve_task(text, info)
    assert caught.value.field == "task"


def test_base_causal_config_without_architectures_is_causal_lm(folders: dict[str, Path]) -> None:
    config = {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 32, "vocab_size": 161}
    path = _zip(folders["base"], folders["root"] / "llama.zip", replace={"config.json": json.dumps(config).encode()})
    assert _sniff(path).task == "causal_lm"


# --- what is refused ------------------------------------------------------------------------------------


def _refused(path: Path) -> BadInputError:
    """Refused by both entry points (the API's sniff_teacher and sniff_hf_zip), with the same error."""
    with pytest.raises(BadInputError) as direct:
        _sniff(path)
    with pytest.raises(BadInputError) as through_teacher:
        sniff_teacher(path)
    assert direct.value.message == through_teacher.value.message
    return direct.value


def test_python_file_in_the_zip_is_refused(folders: dict[str, Path]) -> None:
    path = _zip(folders["base"], folders["root"] / "code.zip", extra={"modeling_x.py": b"import os\n"})
    error = _refused(path)
    assert "modeling_x.py" in error.message and "code" in error.message
    assert error.field == "teacher.file"


def test_python_file_in_a_subfolder_is_refused(folders: dict[str, Path]) -> None:
    path = zip_folder(folders["base"], folders["root"] / "code_nested.zip", top="m",
                      extra={"m/custom/modeling_x.py": b"import os\n"})
    assert "modeling_x.py" in _refused(path).message


def test_config_auto_map_is_refused(folders: dict[str, Path]) -> None:
    config = {**_config(folders["base"]), "auto_map": {"AutoModel": "modeling_x.XModel"}}
    path = _zip(folders["base"], folders["root"] / "auto_map.zip", replace={"config.json": json.dumps(config).encode()})
    error = _refused(path)
    assert "config.json" in error.message and "auto_map" in error.message
    assert error.field == "teacher.file"


def test_tokenizer_config_auto_map_is_refused(folders: dict[str, Path]) -> None:
    tokenizer_config = json.loads((folders["base"] / "tokenizer_config.json").read_text())
    tokenizer_config["auto_map"] = {"AutoTokenizer": ["tokenization_x.XTokenizer", None]}
    path = _zip(folders["base"], folders["root"] / "tok_auto_map.zip",
                replace={"tokenizer_config.json": json.dumps(tokenizer_config).encode()})
    error = _refused(path)
    assert "tokenizer_config.json" in error.message and "auto_map" in error.message


def test_pickled_weights_without_safetensors_are_refused(folders: dict[str, Path]) -> None:
    path = _zip(folders["base"], folders["root"] / "pickle.zip", drop=("model.safetensors",),
                extra={"pytorch_model.bin": b"\x80\x04K\x01."})  # a pickle; never opened
    error = _refused(path)
    assert "safetensors" in error.message and "pytorch_model.bin" in error.message
    assert error.field == "teacher.file"


def test_pickled_weights_beside_safetensors_are_ignored_not_refused(folders: dict[str, Path]) -> None:
    path = _zip(folders["base"], folders["root"] / "both.zip", extra={"pytorch_model.bin": b"\x80\x04K\x01."})
    info = _sniff(path)
    assert info.ignored_files == ["pytorch_model.bin"]
    assert info.weight_files == ["model.safetensors"]


def test_missing_tokenizer_is_refused(folders: dict[str, Path]) -> None:
    path = _zip(folders["base"], folders["root"] / "no_tok.zip", drop=("tokenizer.json",))
    error = _refused(path)
    assert "tokenizer" in error.message
    assert error.field == "teacher.file"


def test_oversized_config_is_refused(folders: dict[str, Path]) -> None:
    import os

    config = {**_config(folders["base"]), "padding": os.urandom(600 * 1024).hex()}  # 1.2 MB, incompressible
    raw = json.dumps(config).encode()
    assert len(raw) > 1024 * 1024
    path = _zip(folders["base"], folders["root"] / "big_config.zip", replace={"config.json": raw})
    error = _refused(path)
    assert "config.json" in error.message and str(len(raw)) in error.message


def test_deeply_nested_config_is_a_bad_input_not_a_recursion_error(folders: dict[str, Path]) -> None:
    raw = ("[" * 100_000 + "]" * 100_000).encode()
    path = _zip(folders["base"], folders["root"] / "nested_json.zip", replace={"config.json": raw})
    error = _refused(path)  # a RecursionError would escape pytest.raises(BadInputError)
    assert "config.json" in error.message


def test_deeply_nested_object_config_is_a_bad_input(folders: dict[str, Path]) -> None:
    raw = ('{"model_type": "bert", "x": ' + '{"a": ' * 100_000 + "1" + "}" * 100_001).encode()
    path = _zip(folders["base"], folders["root"] / "nested_obj.zip", replace={"config.json": raw})
    assert "config.json" in _refused(path).message


def test_zip_slip_member_is_refused(folders: dict[str, Path]) -> None:
    path = _zip(folders["base"], folders["root"] / "slip.zip", extra={"../evil": b"x"})
    with pytest.raises(BadInputError) as direct:
        _sniff(path)
    assert "../evil" in direct.value.message
    with pytest.raises(BadInputError) as through_teacher:
        sniff_teacher(path)
    assert "../evil" in through_teacher.value.message


def test_config_without_model_type_is_refused(folders: dict[str, Path]) -> None:
    config = {key: value for key, value in _config(folders["base"]).items() if key != "model_type"}
    path = _zip(folders["base"], folders["root"] / "no_type.zip", replace={"config.json": json.dumps(config).encode()})
    assert "model_type" in _refused(path).message


def test_truncated_safetensors_header_is_refused(folders: dict[str, Path]) -> None:
    path = _zip(folders["base"], folders["root"] / "short_weights.zip",
                replace={"model.safetensors": (10**9).to_bytes(8, "little") + b"{}"})
    assert "model.safetensors" in _refused(path).message
