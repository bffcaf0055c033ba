"""LM KD throughput: the engine's causal-LM job against a hand-written `transformers` loop and TRL.

    .venv/bin/python bench/lm_kd_throughput.py                # the default run (about 10 minutes, 1 thread, 2 cores)
    .venv/bin/python bench/lm_kd_throughput.py --quick        # a smoke run (fewer blocks, one round)
    .venv/bin/python bench/lm_kd_throughput.py --precisions fp32 bf16   # bf16 too (the matmul ratio is printed)

Needs ../shared/data/text/tinyshakespeare.txt and TRL (`pip install trl`: it keeps torch and
transformers as they are); nothing is downloaded. Everything is made here from config objects:
a byte-level BPE of `--vocab` tokens trained with `tokenizers` on tiny Shakespeare, a random GPT-2
teacher (`--teacher-layers` x `--width`) zipped as a user uploads it, and the first `--blocks`
blocks of `--block` tokens of the text as the training data. Random weights: this measures
throughput, not what is learnt.

The work (the same on every side): a 2-layer GPT-2 student of the teacher's width (random init)
learns the teacher's next-token distribution by forward KL at T = 1 (the soft term only, alpha 1:
TRL's GKD loss has no label term), batch `--batch`, AdamW lr 5e-4 (weight decay 0.01) with cosine
decay and 5% warm-up (a causal_lm job's defaults), no gradient clipping, `--epochs` epochs.

Sides, each in its own fresh process:
* engine live:   `distillery distill spec.yaml` (the engine as users run it): `method.top_k: 0`,
                 the teacher run live on every batch.
* hand live:     a minimal loop over `transformers`: `GPT2LMHeadModel` forward of student and
                 teacher (no_grad), `F.kl_div` over the full logits, `torch.optim.AdamW`,
                 `get_cosine_schedule_with_warmup`.
* trl gkd:       TRL's `GKDTrainer` (`trl.experimental.gkd`) with lmbda 0 (off-policy: the data's own
                 sequences, never generated ones) and beta 0 (forward KL), seq_kd off. TRL's stable
                 `DistillationTrainer` is on-policy only (it generates the student's completions from
                 prompts), which is other work; GKDTrainer is its off-policy form. Its defaults that would
                 change the work are set to the engine's: fp32 unless bf16 is asked, no gradient
                 checkpointing, no gradient clipping, no logging or saving.
* engine cached: the same job with `method.top_k: K`, its teacher top-K cache already in
                 `--lm-cache-dir` (built before the rounds by a first job, for a 3-layer student,
                 untimed): the teacher is neither loaded nor run.
* engine alone:  the same student trained alone (`distill_epochs: 0`, `finetune_epochs: E`: labels only).

Figures: an epoch's time is `train_time_s` from the engine's `history.csv`, and the time from
epoch start to end (`TrainerCallback`) for TRL and the hand loop; the first epoch is left out
(one-off costs), the rest's median taken. Tokens/s counts every input token of an epoch. All
sides run once per round, order rotated each round; ratios are taken inside each round and their
median reported, so load from other users of the machine hits every side alike. Job wall times
(the whole `distillery distill`, evaluation and export included) are printed beside.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "data" / "text" / "tinyshakespeare.txt"
WORK = ROOT / "runs" / "lm_kd_throughput"
DISTILLERY = ROOT / ".venv" / "bin" / "distillery"
EOS = "<|endoftext|>"
LR = 5e-4
WEIGHT_DECAY = 0.01
WARMUP_RATIO = 0.05
TEMPERATURE = 1.0
SEED = 0
SIDES = ("engine live", "hand live", "trl gkd", "engine cached", "engine alone")


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


# ------------------------------------------------------------------------------------- setup


def build_inputs(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Tokenizer, random teacher zip, train/test text: made once per settings, reused across runs."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    folder = work / "teacher"
    teacher_zip = work / "teacher.zip"
    text = CORPUS.read_text(encoding="utf-8")
    if not teacher_zip.exists():
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=args.vocab, special_tokens=[EOS], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tokenizer.train_from_iterator([text], trainer)
        fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, bos_token=EOS, unk_token=None)
        folder.mkdir(parents=True, exist_ok=True)
        fast.save_pretrained(str(folder))
        torch.manual_seed(SEED)
        config = GPT2Config(vocab_size=len(fast), n_positions=max(256, args.block), n_embd=args.width,
                            n_layer=args.teacher_layers, n_head=args.heads, bos_token_id=fast.eos_token_id,
                            eos_token_id=fast.eos_token_id, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        GPT2LMHeadModel(config).save_pretrained(str(folder), safe_serialization=True)
        with zipfile.ZipFile(teacher_zip, "w", compression=zipfile.ZIP_STORED) as archive:
            for file in sorted(folder.iterdir()):
                archive.write(file, f"teacher/{file.name}")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    # The first blocks' worth of text: a prefix of characters whose tokens (plus the eos the engine
    # appends) fill exactly `blocks` x `block` tokens, so every side trains on the same full blocks.
    wanted = args.blocks * args.block
    ids = tokenizer(text[:wanted * 8])["input_ids"]
    cut = len(tokenizer.decode(ids[:wanted - 1]))
    train_text = text[:cut]
    while len(tokenizer(train_text)["input_ids"]) + 1 > wanted:
        train_text = train_text[:-1]
    train = work / "train.txt"
    train.write_text(train_text, encoding="utf-8")
    test = work / "test.txt"
    test.write_text(text[-20_000:], encoding="utf-8")
    tokens = len(tokenizer(train_text)["input_ids"]) + 1
    return {"teacher_zip": str(teacher_zip), "teacher_folder": str(folder), "train": str(train),
            "test": str(test), "tokens": tokens}


# ------------------------------------------------------------------------------------- engine sides


def engine_spec(args: argparse.Namespace, inputs: dict[str, Any], spec_dir: Path, precision: str, *,
                top_k: int, epochs: int, alone: bool = False, student_layers: int = 2) -> dict[str, Any]:
    def rel(path: str) -> str:
        return os.path.relpath(path, spec_dir)

    return {
        "task": "causal_lm",
        "teacher": {"file": rel(inputs["teacher_zip"])},
        "student": {"arch": "hf", "arch_args": {"num_hidden_layers": student_layers}, "init_from_teacher": False},
        "data": {"train": rel(inputs["train"]), "test": rel(inputs["test"]), "max_length": args.block,
                 "val_fraction": 0.0},
        "method": {"name": "kd", "divergence": "forward_kl", "temperature": TEMPERATURE, "alpha": 1.0,
                   "top_k": top_k},
        "stages": {"distill_epochs": 0 if alone else epochs, "finetune_epochs": epochs if alone else 0,
                   "baseline": False, "select": "last"},
        "optim": {"lr": LR, "weight_decay": WEIGHT_DECAY, "schedule": "cosine", "warmup_ratio": WARMUP_RATIO},
        "batch_size": args.batch,
        "eval_batch_size": 64,
        "precision": precision,
        "threads": args.threads,
        "device": "cpu",
        "seed": SEED,
        "export": ["safetensors"],
    }


def run_engine(spec: dict[str, Any], name: str, work: Path, *, cache_dir: Path | None) -> dict[str, Any]:
    """One engine job in its own process (a worker of this script), written as a spec file and run by
    `kdcore.pipeline.run_job`, what `distillery distill spec.yaml` calls."""
    spec_dir = work / "specs"
    spec_path = spec_dir / f"{name}.yaml"
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return run_worker({"kind": "engine", "threads": spec["threads"], "spec": str(spec_path),
                       "out": str(work / "jobs" / name), "cache_dir": str(cache_dir) if cache_dir else None})


def run_engine_job(spec: dict[str, Any]) -> dict[str, Any]:
    """The job through the engine's own entry point; wall and CPU time read at each epoch's end."""
    from kdcore.callbacks import Callbacks
    from kdcore.pipeline import JobInputs, RunOptions, run_job
    from kdcore.spec import load_spec

    class EpochClock(Callbacks):
        def __init__(self) -> None:
            self.marks: list[tuple[float, float]] = []

        def on_stage_start(self, stage: str, epochs: int) -> None:
            if epochs:  # a training stage (check, evaluate, export and report are announced with none)
                self.marks = [(time.perf_counter(), time.process_time())]

        def on_epoch_end(self, progress: Any) -> None:
            # The interval also holds the epoch's checkpoint write (a few MB here): the engine's own cost.
            self.marks.append((time.perf_counter(), time.process_time()))

    path = Path(spec["spec"])
    job = load_spec(path)
    folder = path.parent
    inputs = JobInputs(teacher=(folder / job.teacher.file).resolve(), train=(folder / job.data.train).resolve(),
                       test=(folder / job.data.test).resolve() if job.data.test else None)
    out = Path(spec["out"])
    options = RunOptions(out_dir=out, resume=False,
                         lm_cache_dir=Path(spec["cache_dir"]) if spec["cache_dir"] else None)
    clock = EpochClock()
    result = run_job(job, inputs, options, clock)
    marks = clock.marks
    with (out / "history.csv").open() as handle:
        train_time = [float(row["train_time_s"]) for row in csv.DictReader(handle)]
    return {"epochs": [b[0] - a[0] for a, b in itertools.pairwise(marks)],
            "cpu_s": [b[1] - a[1] for a, b in itertools.pairwise(marks)],
            "train_time_s": train_time, "threads_seen": __import__("torch").get_num_threads(),
            "teacher_cache": result.metrics.get("teacher_cache"), "params": result.metrics["student"]["params"]}


# ------------------------------------------------------------------------------------- hand and TRL sides


def _blocks(spec: dict[str, Any]) -> Any:
    """The training text as the engine packs it: its tokens and an eos, cut into full blocks."""
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(spec["teacher_folder"], local_files_only=True)
    ids = tokenizer(Path(spec["train"]).read_text(encoding="utf-8"))["input_ids"] + [tokenizer.eos_token_id]
    usable = len(ids) // spec["block"] * spec["block"]
    return tokenizer, torch.tensor(ids[:usable]).view(-1, spec["block"])


def _models(spec: dict[str, Any]) -> tuple[Any, Any]:
    """The random teacher from its folder and a 2-layer student of its config (random init)."""
    import copy

    import torch
    from transformers import GPT2LMHeadModel

    teacher = GPT2LMHeadModel.from_pretrained(spec["teacher_folder"], local_files_only=True).eval()
    teacher.requires_grad_(False)
    config = copy.deepcopy(teacher.config)
    config.n_layer = 2
    torch.manual_seed(SEED)
    return teacher, GPT2LMHeadModel(config)


def run_hand(spec: dict[str, Any]) -> dict[str, Any]:
    """The minimal transformers KD loop a practitioner writes: full logits of both, forward KL."""
    import torch
    import torch.nn.functional as F
    from transformers import get_cosine_schedule_with_warmup

    _, blocks = _blocks(spec)
    teacher, student = _models(spec)
    batch, epochs = spec["batch"], spec["epochs"]
    steps = -(-len(blocks) // batch)
    optimizer = torch.optim.AdamW(student.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    scheduler = get_cosine_schedule_with_warmup(optimizer, round(WARMUP_RATIO * steps * epochs), steps * epochs)
    bf16 = spec["precision"] == "bf16"
    generator = torch.Generator().manual_seed(SEED)
    times, cpu = [], []
    student.train()
    for _ in range(epochs):
        started, cpu_started = time.perf_counter(), time.process_time()
        for indices in torch.randperm(len(blocks), generator=generator).split(batch):
            ids = blocks[indices]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                # position t predicts token t+1: the last position has no target, as in the engine
                student_logits = student(input_ids=ids).logits[:, :-1]
                with torch.no_grad():
                    teacher_logits = teacher(input_ids=ids).logits[:, :-1]
            student_log_probs = F.log_softmax(student_logits.float() / TEMPERATURE, dim=-1)
            teacher_log_probs = F.log_softmax(teacher_logits.float() / TEMPERATURE, dim=-1)
            loss = F.kl_div(student_log_probs, teacher_log_probs, log_target=True,
                            reduction="none").sum(-1).mean() * TEMPERATURE ** 2
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        times.append(time.perf_counter() - started)
        cpu.append(time.process_time() - cpu_started)
    return {"epochs": times, "cpu_s": cpu, "threads_seen": torch.get_num_threads(), "tokens": blocks.numel()}


def run_trl(spec: dict[str, Any]) -> dict[str, Any]:
    """TRL's GKDTrainer, off-policy forward KL: lmbda 0, beta 0, seq_kd off."""
    import warnings

    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from transformers.utils import logging as hf_logging
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    warnings.filterwarnings("ignore")
    hf_logging.set_verbosity_error()
    tokenizer, blocks = _blocks(spec)
    teacher, student = _models(spec)
    dataset = Dataset.from_dict({"input_ids": blocks.tolist()})

    def collate(features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids = torch.tensor([feature["input_ids"] for feature in features])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    class EpochTimes(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.started = 0.0

            self.cpu: list[float] = []
            self.threads = 0
            self.cpu_started = 0.0

        def on_epoch_begin(self, *_: Any, **__: Any) -> None:
            self.started, self.cpu_started = time.perf_counter(), time.process_time()

        def on_epoch_end(self, *_: Any, **__: Any) -> None:
            self.times.append(time.perf_counter() - self.started)
            self.cpu.append(time.process_time() - self.cpu_started)
            self.threads = torch.get_num_threads()

    bf16 = spec["precision"] == "bf16"
    config = GKDConfig(
        output_dir=str(Path(spec["work"]) / "trl"), lmbda=0.0, beta=0.0, seq_kd=False, temperature=TEMPERATURE,
        per_device_train_batch_size=spec["batch"], num_train_epochs=spec["epochs"], learning_rate=LR,
        weight_decay=WEIGHT_DECAY, lr_scheduler_type="cosine", warmup_steps=WARMUP_RATIO, max_grad_norm=0.0,
        bf16=bf16, fp16=False, use_cpu=True, gradient_checkpointing=False, max_length=spec["block"],
        logging_strategy="no", save_strategy="no", report_to="none", disable_tqdm=True, seed=SEED,
        dataloader_num_workers=0, dataloader_pin_memory=False, disable_dropout=True,
    )
    timer = EpochTimes()
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=config, train_dataset=dataset,
                         processing_class=tokenizer, data_collator=collate, callbacks=[timer])
    trainer.train()
    return {"epochs": timer.times, "cpu_s": timer.cpu, "threads_seen": timer.threads, "tokens": blocks.numel(),
            "bf16": bool(trainer.args.bf16), "gradient_checkpointing": bool(trainer.args.gradient_checkpointing)}


def matmul_ratio(repeats: int = 3, size: int = 1024) -> dict[str, float]:
    """bf16 / fp32 square-matmul throughput on this CPU at this thread count, medians of `repeats`."""
    import torch

    def tflops(dtype: Any) -> float:
        a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
        for _ in range(2):
            a @ b
        count, started = 0, time.perf_counter()
        while time.perf_counter() - started < 0.4:
            a @ b
            count += 1
        return 2 * size ** 3 * count / (time.perf_counter() - started) / 1e12

    fp32, bf16 = [], []
    for _ in range(repeats):
        fp32.append(tflops(torch.float32))
        bf16.append(tflops(torch.bfloat16))
    return {"fp32_tflops": _median(fp32), "bf16_tflops": _median(bf16),
            "ratio": _median([b / f for b, f in zip(bf16, fp32, strict=True)])}


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(spec["threads"])
    if spec["kind"] == "matmul":
        return matmul_ratio()
    if spec["kind"] == "engine":
        return run_engine_job(spec)
    return run_hand(spec) if spec["kind"] == "hand" else run_trl(spec)


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], cwd=ROOT, env=env,
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {spec['kind']} failed:\n{proc.stderr[-3000:]}")
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "wall_s": time.perf_counter() - started}


# ------------------------------------------------------------------------------------- the run


def measure(args: argparse.Namespace, inputs: dict[str, Any], work: Path) -> dict[str, Any]:
    spec_dir = work / "specs"
    spec_dir.mkdir(parents=True, exist_ok=True)
    cache_dir = work / "lm_cache"
    results: dict[str, Any] = {"tokens": inputs["tokens"], "rounds": {}, "cache_build": {}}
    for precision in args.precisions:
        # The cache the timed jobs reuse: a first job (another, 3-layer student) runs the teacher once.
        spec = engine_spec(args, inputs, spec_dir, precision, top_k=args.top_k, epochs=1, student_layers=3)
        results["cache_build"][precision] = run_engine(spec, f"cache-build-{precision}", work, cache_dir=cache_dir)
        print(f"[{precision}] cache built by a first job in {results['cache_build'][precision]['wall_s']:.1f} s",
              flush=True)
    base = {"threads": args.threads, "teacher_folder": inputs["teacher_folder"], "train": inputs["train"],
            "block": args.block, "batch": args.batch, "epochs": args.epochs, "work": str(work)}
    names = [f"{side} {precision}" for precision in args.precisions for side in SIDES]
    for index in range(args.rounds):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            side, precision = name.rsplit(" ", 1)
            if side.startswith("engine"):
                spec = engine_spec(args, inputs, spec_dir, precision, epochs=args.epochs, alone=side == "engine alone",
                                   top_k=args.top_k if side == "engine cached" else 0)
                result = run_engine(spec, name.replace(" ", "-"), work,
                                    cache_dir=cache_dir if side == "engine cached" else None)
            else:
                result = run_worker({**base, "kind": side.split()[0], "precision": precision})
            result["tokens"] = inputs["tokens"]
            results["rounds"].setdefault(name, []).append(result)
            epoch = _median(result["epochs"][1:] or result["epochs"])
            cpu = _median(result["cpu_s"][1:] or result["cpu_s"])
            print(f"  [round {index + 1}/{args.rounds}] {name:20s} {epoch:6.2f} s/epoch "
                  f"({result['tokens'] / epoch:7.0f} tokens/s), {cpu:6.2f} CPU s/epoch "
                  f"({result['tokens'] / cpu:7.0f} tokens/CPU-s), process {result['wall_s']:.1f} s", flush=True)
    if "bf16" in args.precisions:
        results["matmul"] = [run_worker({"kind": "matmul", "threads": args.threads}) for _ in range(2)]
    return results


def report(results: dict[str, Any], args: argparse.Namespace) -> str:
    rounds = results["rounds"]

    def epoch_s(result: dict[str, Any], key: str = "epochs") -> float:
        return _median(result[key][1:] or result[key])

    def tps(result: dict[str, Any]) -> float:
        """Tokens per CPU-second of the training epochs (one thread: the work itself, not the waiting)."""
        return result["tokens"] / epoch_s(result, "cpu_s")

    count = len(next(iter(rounds.values())))
    first = rounds[f"engine live {args.precisions[0]}"][0]
    lines = [f"CPU, {args.threads} thread(s); teacher GPT-2 {args.teacher_layers} x {args.width} (random), student "
             f"2 x {args.width} ({first['params'] / 1e6:.2f}M parameters), vocabulary {args.vocab} (BPE on tiny "
             f"Shakespeare); {results['tokens']:,} tokens an epoch ({args.blocks} blocks of {args.block}, batch "
             f"{args.batch}); forward KL, T = 1; {args.epochs} epochs per process, epochs 2-{args.epochs} timed; "
             f"{count} round(s), order rotated; top-K = {args.top_k}"]
    matmul = None
    if "matmul" in results:
        matmul = _median([m["ratio"] for m in results["matmul"]])
        lines.append(f"machine bf16/fp32 matmul throughput (1024^2, {args.threads} thread(s)): {matmul:.2f}x "
                     f"(fp32 {_median([m['fp32_tflops'] for m in results['matmul']]):.3f}, bf16 "
                     f"{_median([m['bf16_tflops'] for m in results['matmul']]):.3f} TFLOP/s)")
    lines += ["", "| side | precision | CPU s/epoch | tokens/CPU-s | wall s/epoch | tokens/s (wall) | threads | "
              "process wall s | bf16/fp32 matmul here |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for name, values in rounds.items():
        side, precision = name.rsplit(" ", 1)
        cpu = _median([epoch_s(v, "cpu_s") for v in values])
        wall = _median([epoch_s(v) for v in values])
        ratio = f"{matmul:.2f}x" if precision == "bf16" and matmul else ""
        lines.append(f"| {side} | {precision} | {cpu:.2f} | {results['tokens'] / cpu:,.0f} | {wall:.2f} | "
                     f"{results['tokens'] / wall:,.0f} | {values[0].get('threads_seen', '-')} | "
                     f"{_median([v['wall_s'] for v in values]):.1f} | {ratio} |")

    def per_round(a: str, b: str) -> list[float]:
        """tokens per CPU-second of a / of b, round by round."""
        return [tps(x) / tps(y) for x, y in zip(rounds[a], rounds[b], strict=True)]

    def line(text: str, values: list[float], target: str = "", held: bool | None = None) -> str:
        verdict = f"; target {target}: {'met' if held else 'NOT met'}" if target else ""
        return (f"- {text}: median {_median(values):.3f} (rounds: {', '.join(f'{v:.3f}' for v in values)})"
                f"{verdict}")

    checks = []
    for p in args.precisions:
        engine_hand = per_round(f"engine live {p}", f"hand live {p}")
        checks.append(line(f"engine / hand loop, live teacher, {p} (tokens per CPU-s)", engine_hand, ">= 0.95",
                           _median(engine_hand) >= 0.95))
        engine_trl = per_round(f"engine live {p}", f"trl gkd {p}")
        checks.append(line(f"engine / TRL GKDTrainer, live teacher, {p} (tokens per CPU-s)", engine_trl, ">= 1.3",
                           _median(engine_trl) >= 1.3))
        checks.append(line(f"engine cached top-{args.top_k} / engine live, {p} (tokens per CPU-s)",
                           per_round(f"engine cached {p}", f"engine live {p}")))
        cost = per_round(f"engine alone {p}", f"engine cached {p}")  # time(cached) / time(alone)
        checks.append(line(f"second student's job with the cache / that student alone, {p} (CPU time per epoch)", cost,
                           "<= 1.10", _median(cost) <= 1.10))
        walls = [epoch_s(c) / epoch_s(a) for c, a in zip(rounds[f"engine cached {p}"], rounds[f"engine alone {p}"],
                                                         strict=True)]
        checks.append(line(f"the same in wall time per epoch (busy machine: a cross-check only), {p}", walls))
        build = results["cache_build"][p]
        reused = rounds[f"engine cached {p}"][0]["teacher_cache"]
        checks.append(f"- cache ({p}): built once by a first job in {build['wall_s']:.1f} s (whole job); the timed "
                      f"cached jobs reused it: {reused.get('reused')}, teacher loaded: {reused.get('teacher_loaded')}, "
                      f"teacher forward tokens saved {reused.get('teacher_forward_tokens_saved'):,}")
    if len(args.precisions) > 1:
        for side in ("engine live", "hand live", "trl gkd"):
            checks.append(line(f"{side} bf16 / fp32 (tokens per CPU-s; this machine's matmul {matmul:.2f}x)",
                               per_round(f"{side} bf16", f"{side} fp32")))
    return "\n".join([*lines, "", *checks])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--blocks", type=int, default=128, help="training blocks (an epoch)")
    parser.add_argument("--block", type=int, default=128, help="tokens per block (data.max_length)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=3, help="per process; the first is not timed")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--teacher-layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--top-k", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--precisions", nargs="+", default=["fp32"], choices=["fp32", "bf16"])
    parser.add_argument("--quick", action="store_true", help="64 blocks, 2 epochs, one round")
    parser.add_argument("--json", type=Path, help="also write every measurement here")
    args = parser.parse_args(argv)
    if args.quick:
        args.blocks, args.epochs, args.rounds = 64, 2, 1
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    if not CORPUS.exists():
        print(f"skipped: {CORPUS} is not here (see ../shared/data/text/README.md)")
        return 0
    try:
        import trl  # noqa: F401
    except ImportError:
        print("skipped: TRL is not installed (.venv/bin/pip install trl)")
        return 0
    started = time.monotonic()
    work = WORK / f"v{args.vocab}-w{args.width}-t{args.teacher_layers}-b{args.blocks}x{args.block}"
    work.mkdir(parents=True, exist_ok=True)
    inputs = build_inputs(args, work)
    results = measure(args, inputs, work)
    text = report(results, args)
    print()
    print(text)
    print(f"(whole run: {time.monotonic() - started:.0f} s)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, **results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
