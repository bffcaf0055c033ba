"""Causal-LM jobs on two processes of this CPU (gloo; ddp, fsdp), through the elastic launcher as users run them.

The tiny Llama has no dropout (nor has the tiny GPT-2 made here, whose head is tied to its embedding),
so a rank's half of a batch sees what the single process sees of it: the two-process job must end
where the one-process job ends, up to float rounding. A rank's loss is the mean over its own scored
tokens; weighted by its share of the global batch's tokens, the ranks' averaged gradients are the
single process's.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from tests.kdcore.test_distributed_text import ABS, REL, _distill, _finish, _history, _killed_in_distill, _metrics
from tests.lm_models import make_bpe_tokenizer, make_lm_zip, sentences, write_text_jsonl
from tests.text_models import zip_folder


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("lm_ddp")
    return {"teacher": make_lm_zip(folder, "llama", family="llama", seed=0),
            "train": write_text_jsonl(folder / "train.jsonl", sentences(96, seed=1)),
            "test": write_text_jsonl(folder / "test.jsonl", sentences(24, seed=2))}


def _spec(folder: Path, files: dict[str, Path], *, nproc: int, **method: Any) -> Path:
    spec = {
        "teacher": {"file": str(files["teacher"])},
        "student": {"arch_args": {"num_hidden_layers": 1}},
        "data": {"train": str(files["train"]), "test": str(files["test"]), "max_length": 32},
        "stages": {"distill_epochs": 2},
        "method": {"name": "kd", **method},
        "batch_size": 8,
        "export": ["safetensors"],
        "distributed": {"nproc": nproc},
    }
    path = folder / f"spec-{nproc}-{time.monotonic_ns()}.json"
    path.write_text(json.dumps(spec))
    return path


@pytest.mark.parametrize("method", [{}, {"top_k": 8}], ids=["live-teacher", "top-k-cache"])
def test_a_ddp_lm_job_on_two_processes_matches_the_single_process_job(files: dict[str, Path], tmp_path: Path,
                                                                       method: dict[str, Any]) -> None:
    _finish(_distill(_spec(tmp_path, files, nproc=1, **method), tmp_path / "one"))
    output = _finish(_distill(_spec(tmp_path, files, nproc=2, **method), tmp_path / "two"))
    assert sum(line.startswith('{"out"') for line in output.splitlines()) == 1, output
    one, two = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    assert two["distributed"] == {"world_size": 2, "strategy": "ddp", "global_batch": 8, "per_rank_batch": 4.0,
                                  "backend": "gloo"}
    for a, b in zip(_history(tmp_path / "one"), _history(tmp_path / "two"), strict=True):
        assert (a["stage"], a["epoch"]) == (b["stage"], b["epoch"])
        for key in ("train_loss", "val_loss", "val_accuracy"):
            if a.get(key):
                assert float(b[key]) == pytest.approx(float(a[key]), rel=REL, abs=ABS), (key, a, b)
    assert two["student"]["loss"] == pytest.approx(one["student"]["loss"], rel=REL, abs=ABS)
    assert two["student"]["accuracy"] == pytest.approx(one["student"]["accuracy"], abs=1e-6)
    # The top-K cache is computed once between the ranks: the same rows, the teacher's tokens counted once.
    assert two["teacher_cache"] == one["teacher_cache"]


def _gpt2_zip(folder: Path) -> Path:
    """A 2-layer GPT-2 without dropout: its output head is its input embedding (tied), which FSDP must keep one."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    model_folder = folder / "gpt2_folder"
    tokenizer = make_bpe_tokenizer(model_folder)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=tokenizer.eos_token_id,
                        eos_token_id=tokenizer.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(str(model_folder), safe_serialization=True)
    return zip_folder(model_folder, folder / "gpt2.zip")


def _fsdp_spec(folder: Path, files: dict[str, Path], teacher: str, *, nproc: int, distill_epochs: int = 2,
               **method: Any) -> Path:
    path = _spec(folder, files, nproc=nproc, **method)
    raw = json.loads(path.read_text())
    raw["teacher"]["file"] = str(files[teacher])
    raw["stages"]["distill_epochs"] = distill_epochs
    # replicate_teacher_mb 0: the frozen teacher is sharded too (its cache pass, or its live head in every loss).
    raw["distributed"].update(strategy="fsdp", replicate_teacher_mb=0)
    path.write_text(json.dumps(raw))
    return path


@pytest.fixture(scope="module")
def gpt2(files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {**files, "gpt2": _gpt2_zip(tmp_path_factory.mktemp("lm_gpt2"))}


@pytest.mark.parametrize(("teacher", "method"), [("gpt2", {}), ("teacher", {"top_k": 8})],
                         ids=["gpt2-tied-live-teacher", "llama-top-k-cache"])
def test_an_fsdp_lm_job_on_two_processes_matches_the_single_process_job(gpt2: dict[str, Path], tmp_path: Path,
                                                                         teacher: str, method: dict[str, Any]) -> None:
    _finish(_distill(_fsdp_spec(tmp_path, gpt2, teacher, nproc=1, **method), tmp_path / "one"))
    output = _finish(_distill(_fsdp_spec(tmp_path, gpt2, teacher, nproc=2, **method), tmp_path / "two"))
    assert "it is sharded across the 2 ranks" in output, output
    one, two = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    assert two["distributed"] == {"world_size": 2, "strategy": "fsdp", "global_batch": 8, "per_rank_batch": 4.0,
                                  "backend": "gloo", "teacher": "sharded"}
    for a, b in zip(_history(tmp_path / "one"), _history(tmp_path / "two"), strict=True):
        assert (a["stage"], a["epoch"]) == (b["stage"], b["epoch"])
        for key in ("train_loss", "val_loss", "val_accuracy"):
            if a.get(key):
                assert float(b[key]) == pytest.approx(float(a[key]), rel=REL, abs=ABS), (key, a, b)
    for key in ("teacher", "student", "baseline"):
        assert two[key]["loss"] == pytest.approx(one[key]["loss"], rel=REL, abs=ABS), key
        assert two[key]["accuracy"] == pytest.approx(one[key]["accuracy"], abs=1e-6), key
    # 39 training sequences: the sharded teacher's shorter top-K share is padded, its extra rows dropped.
    assert two["teacher_cache"] == one["teacher_cache"]
    assert (tmp_path / "two" / "student.safetensors").exists()


def test_fsdp_does_not_fine_tune_an_lm_teacher(files: dict[str, Path], tmp_path: Path) -> None:
    from kdcore.errors import KDError
    from kdcore.pipeline import JobInputs, RunOptions, run_job
    from kdcore.spec import parse_spec

    raw = json.loads(_spec(tmp_path, files, nproc=2).read_text())
    raw["distributed"]["strategy"] = "fsdp"
    raw["stages"]["teacher_finetune_epochs"] = 1
    with pytest.raises(KDError) as caught:
        run_job(parse_spec(raw), JobInputs(teacher=files["teacher"], train=files["train"]),
                RunOptions(out_dir=tmp_path / "out"))
    assert caught.value.field == "distributed.strategy"


def test_an_fsdp_lm_checkpoint_resumes_on_one_process(gpt2: dict[str, Path], tmp_path: Path) -> None:
    """Killed inside distillation, the two-rank job's DCP checkpoint (the tied GPT-2 student's shards, its
    optimiser's) carries on in a one-process job, which ends where an uninterrupted one-process job ends."""
    epochs = 4
    _finish(_distill(_fsdp_spec(tmp_path, gpt2, "gpt2", nproc=1, distill_epochs=epochs), tmp_path / "straight"))
    out = tmp_path / "out"
    _killed_in_distill(_fsdp_spec(tmp_path, gpt2, "gpt2", nproc=2, distill_epochs=epochs), out)
    folders = list((out / "checkpoints" / "sharded").iterdir())
    assert folders and all((folder / ".metadata").exists() for folder in folders)

    output = _finish(_distill(_fsdp_spec(tmp_path, gpt2, "gpt2", nproc=1, distill_epochs=epochs), out))
    assert "resuming from the checkpoint after distill epoch" in output, output
    straight, resumed = _history(tmp_path / "straight"), _history(out)
    assert [(row["stage"], row["epoch"]) for row in resumed] == [(row["stage"], row["epoch"]) for row in straight]
    for a, b in zip(straight, resumed, strict=True):
        for key in ("train_loss", "val_loss", "val_accuracy"):
            assert float(b[key]) == pytest.approx(float(a[key]), rel=REL, abs=ABS), (key, a, b)
    one, two = _metrics(tmp_path / "straight"), _metrics(out)
    assert two["student"]["loss"] == pytest.approx(one["student"]["loss"], rel=REL, abs=ABS)
    assert not any((out / "checkpoints" / "sharded").iterdir())  # the plain checkpoint took over


def test_a_sharded_causal_lm_gathers_its_tied_head_for_every_chunk_and_its_recomputation(tmp_path: Path) -> None:
    """In process, one gloo rank: the chunked loss calls the head per chunk, and again in backward (activation
    checkpointing); inside the root's forward (`run_in_root`) every call sees whole weights, and two steps of
    the sharded GPT-2 give the plain model's losses and gradients."""
    import copy

    import torch
    import torch.distributed as dist
    from transformers import GPT2Config, GPT2LMHeadModel

    from kdcore.lm_data import LMBatch
    from kdcore.lm_losses import LossSettings, lm_loss
    from kdcore.lm_models import CausalLM
    from kdcore.sharding import is_sharded, run_in_root, shard_model

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0)
    plain = CausalLM(GPT2LMHeadModel(config), 40)
    sharded = copy.deepcopy(plain)
    ids = torch.randint(0, 40, (3, 12))
    batch = LMBatch(ids, torch.ones_like(ids), torch.cat([ids[:, 1:], torch.full((3, 1), -100)], dim=1))

    def loss(model: CausalLM) -> torch.Tensor:
        hidden, labels = model.scored(batch)
        assert hidden.shape[0] > 4  # several chunks, each checkpointed
        return lm_loss(hidden, labels, model.head, LossSettings(vocab=40), chunk_tokens=4).loss

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        shard_model(sharded)
        assert is_sharded(sharded)
        for _ in range(2):
            expected, got = loss(plain), run_in_root(sharded, lambda: loss(sharded))
            expected.backward()
            got.backward()
            assert got.item() == pytest.approx(expected.item(), rel=1e-6)
            grads = {name: parameter.grad for name, parameter in plain.named_parameters()
                     if parameter.grad is not None}
            for name, parameter in sharded.named_parameters():
                assert parameter.grad is not None, name
                full = parameter.grad.full_tensor()  # type: ignore[attr-defined]
                assert torch.allclose(full, grads[name], rtol=1e-5, atol=1e-6), name
            with torch.no_grad():
                for model in (plain, sharded):
                    for parameter in model.parameters():
                        assert parameter.grad is not None
                        parameter.sub_(0.1 * parameter.grad)
                        parameter.grad = None
    finally:
        dist.destroy_process_group()
