"""Hugging Face causal language models: the teacher folder, the students, generation.

Models are built from `config.json` by `AutoModelForCausalLM` and filled from safetensors only
(`use_safetensors=True`); `trust_remote_code` is never set, and the sniffer has already refused
folders with code or `auto_map`. Every model is wrapped in `CausalLM`, which splits the forward
pass in two: the decoder's final hidden states, and the head that turns them into logits. The
losses (`kdcore.lm_losses`) apply the head chunk by chunk, so a batch's full logits never exist.

One tokenizer for teacher and student: the logits of both are sliced to `len(tokenizer)` before
any loss or prediction, since families pad their embedding matrices beyond the real vocabulary
(Qwen2.5-7B: 152,064 rows, Qwen2.5-0.5B: 151,936, one tokenizer of 151,665 tokens).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from kdcore.architectures import HFArgs
from kdcore.errors import BadInputError, KDError, MismatchError
from kdcore.hf_models import (
    HfFolder,
    StudentPlan,
    _quiet_transformers,
    check_same_tokenizer,
    copy_teacher_layers,
    encoder_layers,
    evenly_spaced,
    load_config,
    load_tokenizer,
)
from kdcore.lm_data import LMBatch

__all__ = ["CausalLM", "build_lm_student", "generate", "load_causal_lm", "load_pretrained_lm_student",
           "load_tokenizer", "planned_student"]


class CausalLM(nn.Module):
    """A transformers causal LM, as the engine uses it: hidden states, a head, the real vocabulary."""

    model: Any  # a transformers PreTrainedModel (its config and methods are not nn.Module's)

    def __init__(self, model: nn.Module, vocab: int) -> None:
        super().__init__()
        self.model = model
        self.vocab = vocab
        config = model.config
        # The few families whose logits are not just lm_head(hidden): Gemma 2/3 cap them, Granite and
        # Cohere scale them. Applied here exactly as their modeling files do.
        self._softcap = getattr(config, "final_logit_softcapping", None)
        self._divide = getattr(config, "logits_scaling", None)
        self._multiply = getattr(config, "logit_scale", None)

    def hidden_states(self, batch: LMBatch) -> torch.Tensor:
        """The decoder's final hidden states (after its last norm), [batch, length, hidden]."""
        output = self.model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                       use_cache=False)
        return output.last_hidden_state

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.model.get_output_embeddings()(hidden)
        if self._divide:
            logits = logits / self._divide
        if self._multiply:
            logits = logits * self._multiply
        if self._softcap:
            logits = torch.tanh(logits / self._softcap) * self._softcap
        return logits

    def forward(self, batch: LMBatch | None = None, *, step: Callable[[], Any] | None = None) -> Any:
        """Logits over the real vocabulary for every position (small inputs only: evaluation, tests).

        `model(step=fn)` runs `fn()` as this module's forward instead: a model sharded with FSDP2
        (`kdcore.sharding.run_in_root`) gathers its root unit (embeddings, final norm, head) and
        reduces their gradients in hooks around its forward, which the loop's own calls of
        `scored` and `head` would otherwise bypass.
        """
        if step is not None:
            return step()
        assert batch is not None
        return self.head(self.hidden_states(batch))[..., :self.vocab]

    def scored(self, batch: LMBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states and labels of the scored positions only, [N, hidden] and [N]."""
        keep = batch.labels != -100
        return self.hidden_states(batch)[keep], batch.labels[keep]

    @property
    def deployable(self) -> nn.Module:
        return self.model


def check_causal_family(config: Any, *, field: str) -> None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise BadInputError(f"transformers has no causal language model for model_type {config.model_type!r}",
                            field=field)


def check_vocabulary(model: nn.Module, tokenizer: Any, *, field: str) -> int:
    """The tokenizer's real vocabulary, which the model's embedding must cover (it may be padded beyond)."""
    rows = int(model.get_output_embeddings().weight.shape[0])  # type: ignore[operator]
    vocab = len(tokenizer)
    if rows < vocab:
        raise MismatchError(f"the model has {rows} output rows for a tokenizer of {vocab} tokens", field=field)
    return vocab


def load_causal_lm(folder: HfFolder, tokenizer: Any, *, field: str, dtype: torch.dtype = torch.float32) -> CausalLM:
    from transformers import AutoModelForCausalLM

    config = load_config(folder, field=field)
    check_causal_family(config, field=field)
    try:
        with _quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(str(folder.path), trust_remote_code=False,
                                                         use_safetensors=True, local_files_only=True, dtype=dtype)
    except (ValueError, OSError, RuntimeError) as exc:
        raise BadInputError(f"the weights do not load into {config.model_type}: {str(exc).splitlines()[0][:300]}",
                            field=field) from None
    return CausalLM(model, check_vocabulary(model, tokenizer, field=field))


def load_pretrained_lm_student(folder: HfFolder, teacher_tokenizer: Any) -> StudentPlan:
    """A pretrained smaller model of the same tokenizer (8B → 1B of one family), used as it is."""
    field = "student.file"
    check_same_tokenizer(teacher_tokenizer, load_tokenizer(folder, field=field), field=field)
    model = load_causal_lm(folder, teacher_tokenizer, field=field)
    config = model.model.config
    depth = len(encoder_layers(model.model)[1])
    return StudentPlan(model, f"pretrained {config.model_type}, {depth} layers x {config.hidden_size}")


def student_config(teacher_config: Any, args: HFArgs, teacher_layers: list[int]) -> Any:
    """The teacher's config with the student's overrides, kept self-consistent."""
    config = copy.deepcopy(teacher_config)
    overrides = args.model_dump(exclude_none=True)
    for key, value in overrides.items():
        setattr(config, key, value)
    heads = config.num_attention_heads
    if config.hidden_size % heads:
        raise KDError(f"{heads} heads do not divide hidden_size {config.hidden_size}: set "
                      "student.arch_args.num_attention_heads", field="student.arch_args", code="bad_input")
    if ("hidden_size" in overrides or "num_attention_heads" in overrides) and getattr(config, "head_dim", None):
        config.head_dim = config.hidden_size // heads  # Llama-style configs store it, and it would go stale
    kv_heads = getattr(config, "num_key_value_heads", None)
    if kv_heads and heads % kv_heads:
        config.num_key_value_heads = heads
    # Qwen2/3, Gemma 3 and others list each layer's attention kind: the student keeps its teachers' kinds.
    kinds = getattr(config, "layer_types", None)
    if isinstance(kinds, list) and kinds:
        config.layer_types = [kinds[min(layer, len(kinds) - 1)] for layer in teacher_layers]
    return config


def depth_plan(teacher_depth: int, args: HFArgs, teacher_layers: list[int] | None) -> list[int]:
    """The teacher layer that seeds each student layer (default evenly spaced, the last of each share)."""
    depth = args.num_hidden_layers or teacher_depth
    layers = teacher_layers or evenly_spaced(teacher_depth, depth)
    if len(layers) != depth:
        raise KDError(f"names {len(layers)} teacher layers for a student of {depth}: give one per student layer",
                      field="student.teacher_layers", code="bad_input")
    if max(layers) >= teacher_depth:
        raise KDError(f"layer {max(layers)} does not exist: the teacher has layers 0-{teacher_depth - 1}",
                      field="student.teacher_layers", code="bad_input")
    return layers


def planned_student(teacher_config: Any, args: HFArgs, teacher_layers: list[int] | None) -> tuple[Any, int]:
    """The student's config and parameter count, from a model built on the meta device (no memory, no time)."""
    from transformers import AutoModelForCausalLM

    layers = depth_plan(teacher_config.num_hidden_layers, args, teacher_layers)
    config = student_config(teacher_config, args, layers)
    with torch.device("meta"), _quiet_transformers():
        model = AutoModelForCausalLM.from_config(config)
    return config, sum(p.numel() for p in model.parameters())


def build_lm_student(teacher_config: Any, args: HFArgs, *, vocab: int, seed: int, teacher: nn.Module | None,
                     teacher_layers: list[int] | None) -> StudentPlan:
    """The teacher's family, resized; given the teacher's model, its embeddings, head and chosen layers (Minitron)."""
    from transformers import AutoModelForCausalLM

    layers = depth_plan(teacher_config.num_hidden_layers, args, teacher_layers)
    config = student_config(teacher_config, args, layers)
    torch.manual_seed(seed)
    with _quiet_transformers():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plan = StudentPlan(CausalLM(model, vocab), f"{config.model_type}, {len(layers)} layers x {config.hidden_size}",
                       teacher_layers=layers)
    if teacher is not None:
        plan.shared_parameters = copy_teacher_layers(teacher, model, layers)
    return plan


# --- generation -----------------------------------------------------------------------------------------


def _real_vocabulary(vocab: int) -> Any:
    from transformers import LogitsProcessor

    class RealVocabulary(LogitsProcessor):
        """Padded embedding rows are not tokens: never generate them."""

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            scores[:, vocab:] = float("-inf")
            return scores

    return RealVocabulary()


@torch.inference_mode()
def generate(model: CausalLM, prompts: list[list[int]], *, max_new_tokens: int, sample: bool, tokenizer: Any,
             batch_size: int = 16, min_new_tokens: int = 0) -> list[list[int]]:
    """Each prompt's continuation (ending at eos where the model wrote one), batched with left padding."""
    from transformers import LogitsProcessorList

    model.eval()
    device = next(model.parameters()).device
    pad = int(tokenizer.pad_token_id)
    eos = tokenizer.eos_token_id
    answers: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        part = [prompt or [pad] for prompt in prompts[start:start + batch_size]]
        width = max(len(prompt) for prompt in part)
        ids = torch.full((len(part), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, prompt in enumerate(part):
            ids[row, width - len(prompt):] = torch.tensor(prompt)
            mask[row, width - len(prompt):] = 1
        with _quiet_transformers():
            output = model.model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                min_new_tokens=min_new_tokens, do_sample=sample, temperature=1.0 if sample else None, top_p=None,
                top_k=None, pad_token_id=pad, eos_token_id=eos,
                logits_processor=LogitsProcessorList([_real_vocabulary(model.vocab)]))
        for row in output[:, width:].tolist():
            answers.append(row[:row.index(eos) + 1] if eos is not None and eos in row else row)
    return answers


def generation_tokens_per_s(model: CausalLM, prompt: list[int], tokenizer: Any, *, tokens: int = 32) -> float:
    """Greedy generation speed at batch 1 on the CPU, in new tokens per second (after one warm-up run)."""
    device = next(model.parameters()).device
    model.cpu()
    try:
        generate(model, [prompt], max_new_tokens=4, sample=False, tokenizer=tokenizer, min_new_tokens=4)
        started = time.perf_counter()
        generate(model, [prompt], max_new_tokens=tokens, sample=False, tokenizer=tokenizer, min_new_tokens=tokens)
        return tokens / max(time.perf_counter() - started, 1e-9)
    finally:
        model.to(device)
