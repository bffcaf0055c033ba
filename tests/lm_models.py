"""Tiny causal language models, a byte-level BPE tokenizer and LM data that the tests make for themselves.

The tokenizer is trained with `tokenizers` on the test's own sentences and given a small jinja chat
template; the models (GPT-2 and Llama families, 2 layers x 32) are built from configs with random
weights and saved with `save_pretrained` (safetensors), zipped as a user would upload them. The text
is a little grammar whose next words are predictable, so a model learns it in a few steps.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from tests.text_models import zip_folder

SUBJECTS = ["the cat", "a dog", "the king", "my friend", "the bird", "a child"]
VERBS = ["sees", "likes", "finds", "eats", "calls", "follows"]
OBJECTS = ["the fish", "a ball", "the queen", "some bread", "the moon", "a song"]
ENDINGS = ["today.", "at night.", "in the garden.", "again."]
EOS = "<|endoftext|>"
SPECIALS = [EOS, "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def sentences(n: int, *, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(ENDINGS)}"
            for _ in range(n)]


def make_bpe_tokenizer(folder: Path, *, corpus: list[str] | None = None, chat_template: bool = True,
                       vocab_size: int = 320) -> Any:
    """A GPT-2-style byte-level BPE tokenizer trained on the test grammar, saved with save_pretrained."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus or sentences(400, seed=123), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, bos_token=EOS, unk_token=None,
                                   additional_special_tokens=SPECIALS[1:],
                                   chat_template=CHAT_TEMPLATE if chat_template else None)
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(folder))
    return fast


def make_lm_folder(folder: Path, *, family: str = "gpt2", layers: int = 2, hidden: int = 32, heads: int = 2,
                   vocab_padding: int = 0, seed: int = 0, tokenizer_corpus: list[str] | None = None,
                   chat_template: bool = True) -> Path:
    """A random tiny causal LM with its tokenizer; `vocab_padding` extra embedding rows beyond the tokenizer."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tokenizer = make_bpe_tokenizer(folder, corpus=tokenizer_corpus, chat_template=chat_template)
    vocab = len(tokenizer) + vocab_padding
    torch.manual_seed(seed)
    model: Any
    if family == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=256, n_embd=hidden, n_layer=layers,
                                           n_head=heads, bos_token_id=tokenizer.eos_token_id,
                                           eos_token_id=tokenizer.eos_token_id))
    else:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 2,
                                             num_hidden_layers=layers, num_attention_heads=heads,
                                             num_key_value_heads=max(1, heads // 2), max_position_embeddings=256,
                                             bos_token_id=tokenizer.eos_token_id,
                                             eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False))
    model.save_pretrained(str(folder), safe_serialization=True)
    return folder


def make_lm_zip(root: Path, name: str, **kwargs: Any) -> Path:
    folder = make_lm_folder(root / f"{name}_folder", **kwargs)
    return zip_folder(folder, root / f"{name}.zip")


def write_text_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    return path


def write_completion_jsonl(path: Path, texts: list[str], *, with_completion: bool = True) -> Path:
    rows = []
    for text in texts:
        words = text.split()
        row = {"prompt": " ".join(words[:2])}
        if with_completion:
            row["completion"] = " " + " ".join(words[2:])
        rows.append(json.dumps(row))
    path.write_text("\n".join(rows) + "\n")
    return path


def write_chat_jsonl(path: Path, texts: list[str]) -> Path:
    rows = []
    for text in texts:
        words = text.split()
        rows.append(json.dumps({"messages": [{"role": "user", "content": " ".join(words[:2])},
                                             {"role": "assistant", "content": " ".join(words[2:])}]}))
    path.write_text("\n".join(rows) + "\n")
    return path
