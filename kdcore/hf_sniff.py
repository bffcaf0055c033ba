"""Cheap, torch-free inspection of a Hugging Face model folder uploaded as a zip (`format: hf`).

The API runs this on every such upload: the member list (through the same archive checks as
datasets), `config.json`, the safetensors headers and the tokenizer files, never the weights
and never transformers (which would pull torch into the API). Refused here: code (`*.py`,
`auto_map`), pickled weights without safetensors, a missing tokenizer, an oversized config.
Whether transformers knows the `model_type` is checked by the worker, which imports it anyway.
"""

from __future__ import annotations

import hashlib
import json
import struct
import zipfile
from pathlib import PurePosixPath
from typing import Any, Literal

from pydantic import BaseModel, Field

from kdcore.archive import DEFAULT_LIMITS, ArchiveLimits, check_zip, read_member
from kdcore.errors import BadInputError

HfTask = Literal["text_classification", "causal_lm"]

MAX_CONFIG_BYTES = 1024 * 1024
MAX_SAFETENSORS_HEADER = 100_000_000
MAX_TOKENIZER_BYTES = 64 * 1024 * 1024  # Gemma's is about 33 MB; larger ones are left to the worker's check
CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
# The files transformers builds a tokenizer from without running code (fast JSON, WordPiece, BPE, SentencePiece).
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "tokenizer.model",
                   "sentencepiece.bpe.model")
_CODE_SUFFIXES = frozenset({".py", ".pyc", ".pyo", ".so", ".dll", ".dylib", ".ipynb"})
_PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".h5", ".msgpack"})
# Families whose base configs are decoders; architectures (`...ForCausalLM`) decide where they are given.
_DECODER_TYPES = frozenset({
    "gpt2", "gpt_neo", "gpt_neox", "gptj", "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3",
    "qwen3_moe", "phi", "phi3", "gemma", "gemma2", "gemma3_text", "opt", "falcon", "bloom", "olmo", "olmo2",
    "stablelm", "starcoder2", "codegen", "smollm3", "granite",
})
_FIELD = "teacher.file"


class HfInfo(BaseModel):
    """What an hf model folder holds, as read from its config and headers."""

    root: str = Field(description="The folder inside the zip that holds config.json ('' for the zip's top).")
    model_type: str
    task: HfTask
    architectures: list[str] = Field(default_factory=list)
    num_layers: int | None = None
    hidden_size: int | None = None
    vocab_size: int | None = None
    labels: list[str] | None = Field(default=None, description="id2label in index order, for classifiers.")
    has_classifier: bool = Field(description="A ...ForSequenceClassification head is in the weights.")
    params: int = Field(description="Parameters counted from the safetensors headers.")
    weight_files: list[str]
    tokenizer_files: list[str]
    ignored_files: list[str] = Field(default_factory=list, description="Pickled weights beside safetensors, unused.")
    tokenizer_size: int | None = Field(default=None, description="Tokens in tokenizer.json (added tokens included).")
    vocab_sha256: str | None = Field(
        default=None, description="sha256 of tokenizer.json's token → id map: two models share a tokenizer only "
        "where these agree (None without a tokenizer.json).")


def is_hf_folder(names: list[str]) -> bool:
    """A config.json at the zip's top or in its one top folder."""
    return _root_of(names) is not None


def sniff_hf_zip(zf: zipfile.ZipFile, *, limits: ArchiveLimits | None = None, field: str = _FIELD) -> HfInfo:
    infos = [info for info in check_zip(zf, limits or DEFAULT_LIMITS) if not info.is_dir()]
    names = [info.filename for info in infos]
    root = _root_of(names)
    if root is None:
        raise BadInputError("the zip has no config.json at its top or in its one top folder", field=field)
    members = {name.removeprefix(root): info for name, info in ((i.filename, i) for i in infos)
               if name.startswith(root)}
    _refuse_code(members, field)
    config = _read_json(zf, members[CONFIG_NAME], CONFIG_NAME, field, max_bytes=MAX_CONFIG_BYTES)
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise BadInputError("config.json has no model_type: it is not a transformers model folder", field=field)
    _refuse_remote_code(zf, members, config, field)
    weights, shapes, ignored = _weights(zf, members, field)
    tokenizer = [name for name in TOKENIZER_FILES if name in members]
    if not tokenizer:
        raise BadInputError(
            "the folder has no tokenizer: add tokenizer.json (or vocab.txt / vocab.json + merges.txt), as "
            "`tokenizer.save_pretrained(folder)` writes", field=field)
    if "vocab.json" in tokenizer and "merges.txt" not in members and "tokenizer.json" not in members:
        raise BadInputError("vocab.json needs its merges.txt (a BPE tokenizer)", field=field)
    vocab = _tokenizer_vocab(zf, members["tokenizer.json"], field) if "tokenizer.json" in members else None
    architectures = [a for a in config.get("architectures") or [] if isinstance(a, str)]
    has_classifier = any(a.endswith("ForSequenceClassification") for a in architectures)
    return HfInfo(
        root=root,
        model_type=model_type,
        task=_task_of(model_type, architectures),
        architectures=architectures,
        num_layers=_int(config, "num_hidden_layers", "n_layer", "n_layers", "num_layers"),
        hidden_size=_int(config, "hidden_size", "n_embd", "dim", "d_model"),
        vocab_size=_int(config, "vocab_size"),
        labels=_labels(config) if has_classifier else None,
        has_classifier=has_classifier,
        params=sum(_numel(shape) for shape in shapes.values()),
        weight_files=weights,
        tokenizer_files=tokenizer,
        ignored_files=ignored,
        tokenizer_size=len(vocab) if vocab is not None else None,
        vocab_sha256=vocab_fingerprint(vocab) if vocab is not None else None,
    )


def _tokenizer_vocab(zf: zipfile.ZipFile, info: zipfile.ZipInfo, field: str) -> dict[str, int] | None:
    """tokenizer.json's token → id map as `get_vocab()` gives it: the model's vocabulary (a map for BPE and
    WordPiece, a list of [piece, score] for Unigram) and the added tokens. None for a layout not known here."""
    if info.file_size > MAX_TOKENIZER_BYTES:
        return None
    model = (tokenizer := _parse_json(read_member(zf, info), "tokenizer.json", field)).get("model")
    raw = model.get("vocab") if isinstance(model, dict) else None
    vocab: dict[str, int]
    if isinstance(raw, dict):
        vocab = {str(token): index for token, index in raw.items() if isinstance(index, int)}
    elif isinstance(raw, list):
        vocab = {str(entry[0]): index for index, entry in enumerate(raw) if isinstance(entry, list) and entry}
    else:
        return None
    for added in tokenizer.get("added_tokens") or []:
        if isinstance(added, dict) and isinstance(added.get("id"), int) and isinstance(added.get("content"), str):
            vocab[added["content"]] = added["id"]
    return vocab


def vocab_fingerprint(vocab: dict[str, int]) -> str:
    return hashlib.sha256(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode()).hexdigest()


def _root_of(names: list[str]) -> str | None:
    if CONFIG_NAME in names:
        return ""
    tops = {name.split("/", 1)[0] for name in names if "/" in name and not name.startswith("__MACOSX/")}
    if len(tops) == 1:
        top = tops.pop()
        if f"{top}/{CONFIG_NAME}" in names:
            return f"{top}/"
    return None


def _refuse_code(members: dict[str, zipfile.ZipInfo], field: str) -> None:
    code = sorted(name for name in members if PurePosixPath(name).suffix.lower() in _CODE_SUFFIXES)
    if code:
        raise BadInputError(
            f"the folder holds code ({', '.join(code[:3])}): custom model code is never run; upload a model "
            "whose model_type transformers knows, without .py files", field=field)


def _refuse_remote_code(zf: zipfile.ZipFile, members: dict[str, zipfile.ZipInfo], config: dict[str, Any],
                        field: str) -> None:
    if "auto_map" in config:
        raise BadInputError("config.json has auto_map (custom code via trust_remote_code), which is never run",
                            field=field)
    if "tokenizer_config.json" in members:
        tokenizer_config = _read_json(zf, members["tokenizer_config.json"], "tokenizer_config.json", field,
                                      max_bytes=MAX_CONFIG_BYTES * 16)
        if "auto_map" in tokenizer_config:
            raise BadInputError("tokenizer_config.json has auto_map (a custom tokenizer class), which is never run",
                                field=field)


def _weights(zf: zipfile.ZipFile, members: dict[str, zipfile.ZipInfo],
             field: str) -> tuple[list[str], dict[str, list[int]], list[str]]:
    pickles = sorted(name for name in members if PurePosixPath(name).suffix.lower() in _PICKLE_SUFFIXES)
    if SAFETENSORS_INDEX in members:
        index = _read_json(zf, members[SAFETENSORS_INDEX], SAFETENSORS_INDEX, field, max_bytes=64 * 1024 * 1024)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise BadInputError(f"{SAFETENSORS_INDEX} has no weight_map", field=field)
        files = sorted({str(name) for name in weight_map.values()})
    elif SAFETENSORS_NAME in members:
        files = [SAFETENSORS_NAME]
    else:
        found = f" (found {', '.join(pickles[:3])}: pickles, never loaded)" if pickles else ""
        raise BadInputError(
            f"the folder has no safetensors weights{found}; save with `model.save_pretrained(folder)`, which "
            "writes model.safetensors", field=field)
    shapes: dict[str, list[int]] = {}
    for name in files:
        if name not in members:
            raise BadInputError(f"{SAFETENSORS_INDEX} names {name!r}, which is not in the zip", field=field)
        for tensor, shape in _safetensors_shapes(zf, members[name], name, field).items():
            if tensor in shapes:
                raise BadInputError(f"tensor {tensor!r} is stored in more than one shard", field=field)
            shapes[tensor] = shape
    return files, shapes, pickles


def _safetensors_shapes(zf: zipfile.ZipFile, info: zipfile.ZipInfo, name: str, field: str) -> dict[str, list[int]]:
    """The header of a safetensors member, read from its first bytes only."""
    try:
        with zf.open(info) as handle:
            head = handle.read(8)
            if len(head) < 8:
                raise BadInputError(f"{name} is truncated", field=field)
            (length,) = struct.unpack("<Q", head)
            if length > MAX_SAFETENSORS_HEADER or 8 + length > info.file_size:
                raise BadInputError(f"{name} has an impossible header length {length}", field=field)
            raw = handle.read(length)
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise BadInputError(f"{name} cannot be read: {exc}", field=field) from None
    header = _parse_json(raw, name, field)
    header.pop("__metadata__", None)
    shapes: dict[str, list[int]] = {}
    for tensor, entry in header.items():
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise BadInputError(f"{name}: tensor {tensor!r} has an invalid shape", field=field)
        shapes[tensor] = shape
    return shapes


def _read_json(zf: zipfile.ZipFile, info: zipfile.ZipInfo, name: str, field: str, *, max_bytes: int) -> dict[str, Any]:
    if info.file_size > max_bytes:
        raise BadInputError(f"{name} is {info.file_size} bytes, more than the limit of {max_bytes}", field=field)
    return _parse_json(read_member(zf, info), name, field)


def _parse_json(raw: bytes, name: str, field: str) -> dict[str, Any]:
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadInputError(f"{name} is not valid JSON ({exc})", field=field) from None
    except RecursionError:
        raise BadInputError(f"{name} nests too deeply to be a real file", field=field) from None
    if not isinstance(value, dict):
        raise BadInputError(f"{name} is not a JSON object", field=field)
    return value


def _task_of(model_type: str, architectures: list[str]) -> HfTask:
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        return "causal_lm"
    if architectures:
        return "text_classification"
    return "causal_lm" if model_type in _DECODER_TYPES else "text_classification"


def _labels(config: dict[str, Any]) -> list[str] | None:
    id2label = config.get("id2label")
    if not isinstance(id2label, dict) or not id2label:
        return None
    try:
        pairs = sorted((int(key), str(value)) for key, value in id2label.items())
    except (TypeError, ValueError):
        return None
    if [index for index, _ in pairs] != list(range(len(pairs))):
        return None
    return [label for _, label in pairs]


def _int(config: dict[str, Any], *keys: str) -> int | None:
    for key in keys:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _numel(shape: list[int]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count
