"""Distil a 6-layer character-level GPT-2 on tiny Shakespeare into 2 layers with `distillery distill`.

    .venv/bin/python bench/reproduce_lm.py                    # the default run (about 35-40 min, 1 thread)
    .venv/bin/python bench/reproduce_lm.py --seeds 0          # one seed
    .venv/bin/python bench/reproduce_lm.py --table-only       # the table again from the results JSON
    .venv/bin/python bench/reproduce_lm.py --quick            # a smoke run of every step (2-3 minutes)

The data: ../shared/data/text/tinyshakespeare.txt, cut as nanoGPT cuts it (the first 90% of the
characters train, the last 10% test), written to `<out>/data/`. The tokenizer is character-level
(a byte-level BPE trained with `tokenizers` whose vocabulary is the corpus's 65 characters plus an
eos, no merges), so the losses are nats per character and compare with nanoGPT's char models
(its CPU "baby" config, 4 layers x 128 at block 64, reaches about 1.88 validation loss).

Every step is a `distillery distill SPEC --out DIR` job (specs written to `<out>/specs/`, paths
relative to that folder, as the CLI resolves them):

1. `teacher`: a hard-label-only job (`distill_epochs: 0`, `finetune_epochs: N`, no baseline) whose
   student is a 6-layer GPT-2 trained from scratch (`init_from_teacher: false`); the "teacher"
   file of that job is a random 6-layer GPT-2 that is only evaluated. Its `student_hf.zip` is the
   teacher of every other job.
2. per seed, a 2-layer student of the teacher's width, from scratch (`init_from_teacher: false`):
   * `fkl-s<seed>`:  forward KL, full logits (the teacher run live, `top_k: 0`), alpha 1
     (the soft term only), plus the baseline (the same initialisation on the labels alone);
   * `rkl-s<seed>`:  reverse KL, full logits;
   * `top32-s<seed>`: forward KL against the teacher's cached top-32 (`method.top_k: 32`).
   The baseline is trained once per seed (in `fkl`): the same seed gives the same initialisation
   and batch order in every job, so the other jobs' baselines would be the same model.

Everything is scored on the test split (`metrics.json`: loss in nats per token). Each finished job's
figures go into `--results` (default bench/results/reproduce_lm.json) as they come; a later run skips
jobs already there (or whose metrics.json exists), so a cut-off run goes on where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "data" / "text" / "tinyshakespeare.txt"
DEFAULT_OUT = ROOT / "runs" / "lm"
DEFAULT_RESULTS = ROOT / "bench" / "results" / "reproduce_lm.json"
DISTILLERY = ROOT / ".venv" / "bin" / "distillery"
EOS = "<|endoftext|>"
TRAIN_SHARE = 0.9  # nanoGPT's split: the first 90% of the characters


# --------------------------------------------------------------------------------------- data and models


def split_corpus(out: Path) -> tuple[Path, Path]:
    """The first 90% of the characters as train, the rest as test (plain .txt: one document each)."""
    data = out / "data"
    train, test = data / "shakespeare-train.txt", data / "shakespeare-test.txt"
    if not (train.exists() and test.exists()):
        data.mkdir(parents=True, exist_ok=True)
        text = CORPUS.read_text(encoding="utf-8")
        cut = int(len(text) * TRAIN_SHARE)
        train.write_text(text[:cut], encoding="utf-8")
        test.write_text(text[cut:], encoding="utf-8")
    return train, test


def char_tokenizer(folder: Path, text: str) -> Any:
    """A byte-level BPE with no merges: one token per character of the corpus (ASCII), plus an eos.

    Byte-level BPE rather than a hand-made vocabulary so that the folder is an ordinary
    `tokenizer.json` that `AutoTokenizer` (and so the engine and any user) loads and decodes.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    alphabet = {char for word, _ in pre_tokenizers.ByteLevel(add_prefix_space=False).pre_tokenize_str(text)
                for char in word}
    # vocab_size = the alphabet + eos: the trainer then learns no merge at all.
    trainer = trainers.BpeTrainer(vocab_size=len(alphabet) + 1, special_tokens=[EOS], show_progress=False)
    tokenizer.train_from_iterator([text], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, bos_token=EOS, unk_token=None)
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(folder))
    return fast


def gpt2_zip(path: Path, tokenizer_text: str, *, layers: int, width: int, heads: int, block: int, seed: int) -> Path:
    """A random GPT-2 of this size with the character tokenizer, zipped as a user uploads an hf folder."""
    import zipfile

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = path.with_suffix("")
    tokenizer = char_tokenizer(folder, tokenizer_text)
    torch.manual_seed(seed)
    # n_positions above the block: the report continues test prompts by 32 tokens, which must not run
    # past the position table (a --quick block of 32 would), while training only ever uses `block`.
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=max(256, block), n_embd=width, n_layer=layers,
                        n_head=heads,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                        # No dropout, as nanoGPT's CPU "baby" config: a model this small does not overfit
                        # 1M characters in a couple of epochs, and dropout would only slow its learning.
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    GPT2LMHeadModel(config).save_pretrained(str(folder), safe_serialization=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        for file in sorted(folder.iterdir()):
            archive.write(file, f"{path.stem}/{file.name}")
    return path


# --------------------------------------------------------------------------------------- jobs


@dataclass
class Job:
    name: str
    kind: str  # teacher | fkl | rkl | top32
    seed: int
    spec: dict[str, Any]
    lm_cache: bool = False


def build_jobs(args: argparse.Namespace, out: Path, spec_dir: Path, train: Path, test: Path) -> list[Job]:
    def rel(path: Path) -> str:
        return os.path.relpath(path, spec_dir)

    common: dict[str, Any] = {
        "task": "causal_lm",
        "data": {"train": rel(train), "test": rel(test), "max_length": args.block, "val_fraction": 0.0},
        "optim": {"lr": args.lr, "weight_decay": 0.01, "schedule": "cosine", "warmup_ratio": 0.05},
        "batch_size": args.batch,
        "eval_batch_size": 64,
        "precision": args.precision,
        "threads": args.threads,
        "device": "cpu",
        "export": ["hf"],
    }
    jobs = [Job("teacher", "teacher", 0, {
        **common,
        "name": "shakespeare-teacher-L6",
        "teacher": {"file": rel(out / "random-L6.zip")},
        "student": {"arch": "hf", "arch_args": {"num_hidden_layers": args.teacher_layers},
                    "init_from_teacher": False},
        "method": {"name": "kd"},
        "stages": {"distill_epochs": 0, "finetune_epochs": args.teacher_epochs, "baseline": False, "select": "last"},
        "seed": 0,
    })]
    teacher = rel(out / "teacher" / "student_hf.zip")
    for seed in args.seeds:
        for kind in args.methods:
            divergence = "reverse_kl" if kind == "rkl" else "forward_kl"
            jobs.append(Job(f"{kind}-s{seed}", kind, seed, {
                **common,
                "name": f"shakespeare-L2-{kind}-s{seed}",
                "teacher": {"file": teacher},
                "student": {"arch": "hf", "arch_args": {"num_hidden_layers": args.student_layers},
                            "init_from_teacher": False},
                "method": {"name": "kd", "divergence": divergence, "temperature": 1.0, "alpha": args.alpha,
                           "top_k": args.top_k if kind == "top32" else 0},
                "stages": {"distill_epochs": args.student_epochs, "baseline": kind == "fkl", "select": "last"},
                "seed": seed,
            }, lm_cache=kind == "top32"))
    return jobs


def summary(metrics: dict[str, Any], wall_s: float) -> dict[str, Any]:
    """What the table needs of a job's metrics.json."""
    keep = ("loss", "perplexity", "accuracy", "params")
    result = {key: {k: metrics[key][k] for k in keep if k in metrics[key]}
              for key in ("teacher", "student", "baseline") if key in metrics}
    result["agreement"] = metrics.get("agreement")
    result["teacher_cache"] = metrics.get("teacher_cache")
    result["wall_s"] = wall_s
    return result


def run(job: Job, out: Path, spec_dir: Path, results: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    if job.name in results["jobs"]:
        print(f"[{job.name}] done before ({args.results.name})", flush=True)
        return results["jobs"][job.name]
    job_out = out / job.name
    metrics_path = job_out / "metrics.json"
    if not metrics_path.exists():
        spec_path = spec_dir / f"{job.name}.yaml"
        command = [str(DISTILLERY), "distill", os.path.relpath(spec_path, ROOT), "--out",
                   os.path.relpath(job_out, ROOT)]
        if job.lm_cache:
            command += ["--lm-cache-dir", os.path.relpath(out / "lm_cache", ROOT)]
        print(f"[{job.name}] {' '.join(command[1:])}", flush=True)
        started = time.monotonic()
        subprocess.run(command, cwd=ROOT, check=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        (job_out / "wall_time_s.txt").write_text(f"{time.monotonic() - started:.1f}\n")
    wall = float((job_out / "wall_time_s.txt").read_text()) if (job_out / "wall_time_s.txt").exists() else 0.0
    results["jobs"][job.name] = summary(json.loads(metrics_path.read_text()), wall)
    save(args.results, results)
    print(f"[{job.name}] {wall:.0f} s: " + ", ".join(f"{key} {value['loss']:.4f}" for key, value in
                                                    results["jobs"][job.name].items()
                                                    if isinstance(value, dict) and "loss" in value), flush=True)
    return results["jobs"][job.name]


def save(path: Path, results: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(results, indent=1) + "\n")
    os.replace(temporary, path)


# --------------------------------------------------------------------------------------- the table


def _mean_sd(values: list[float]) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


LABELS = {"fkl": "forward_kl, full logits (live teacher)", "rkl": "reverse_kl, full logits (live teacher)",
          "top32": "forward_kl, top-32 cache"}


def table(results: dict[str, Any], seeds: list[int], methods: list[str]) -> str:
    jobs = results["jobs"]
    lines = []
    if "teacher" in jobs:
        teacher = jobs["teacher"]["student"]
        lines.append(f"teacher (6 layers, hard labels only): test loss {teacher['loss']:.4f} nats/char, accuracy "
                     f"{100 * teacher['accuracy']:.2f}%, {teacher['params'] / 1e6:.2f}M parameters, "
                     f"{jobs['teacher']['wall_s']:.0f} s")
    baselines = {seed: jobs[f"fkl-s{seed}"]["baseline"]["loss"] for seed in seeds
                 if f"fkl-s{seed}" in jobs and "baseline" in jobs[f"fkl-s{seed}"]}
    lines += ["", "| student (2 layers) | seeds | baseline (scratch) | distilled | gain (nats) | below baseline "
              "| agreement | s per job |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    per_seed_lines = ["", "| job | seed | teacher | baseline | distilled |", "| --- | --- | --- | --- | --- |"]
    for kind in methods:
        done = [seed for seed in seeds if f"{kind}-s{seed}" in jobs]
        if not done:
            continue
        student = [jobs[f"{kind}-s{seed}"]["student"]["loss"] for seed in done]
        base = [baselines[seed] for seed in done if seed in baselines]
        below = sum(1 for seed, loss in zip(done, student, strict=True) if seed in baselines and loss < baselines[seed])
        gain = f"{statistics.mean(base) - statistics.mean(student):+.4f}" if base else "—"
        agreement = statistics.mean(jobs[f"{kind}-s{seed}"]["agreement"] for seed in done)
        wall = statistics.mean(jobs[f"{kind}-s{seed}"]["wall_s"] for seed in done)
        lines.append(f"| {LABELS[kind]} | {', '.join(map(str, done))} | {_mean_sd(base)} | {_mean_sd(student)} | "
                     f"{gain} | {below} of {len(base)} | {100 * agreement:.1f}% | {wall:.0f} |")
        for seed in done:
            job = jobs[f"{kind}-s{seed}"]
            base_text = f"{baselines[seed]:.4f}" if seed in baselines else "—"
            per_seed_lines.append(f"| {kind} | {seed} | {job['teacher']['loss']:.4f} | {base_text} | "
                                  f"{job['student']['loss']:.4f} |")
    checks = []
    for kind in methods:
        pairs = [(jobs[f"{kind}-s{seed}"]["student"]["loss"], baselines[seed]) for seed in seeds
                 if f"{kind}-s{seed}" in jobs and seed in baselines]
        if pairs:
            held = all(student < base for student, base in pairs)
            checks.append(f"{LABELS[kind]}: below its scratch baseline on {sum(s < b for s, b in pairs)} of "
                          f"{len(pairs)} seeds: target {'met' if held else 'NOT met'}")
    pairs = [(jobs[f"top32-s{seed}"]["student"]["loss"], jobs[f"fkl-s{seed}"]["student"]["loss"]) for seed in seeds
             if f"top32-s{seed}" in jobs and f"fkl-s{seed}" in jobs]
    if pairs:
        gaps = [top / full - 1 for top, full in pairs]
        mean_gap = statistics.mean(top for top, _ in pairs) / statistics.mean(full for _, full in pairs) - 1
        checks.append(f"top-32 against full logits (forward_kl): mean loss {mean_gap:+.2%} (per seed "
                      f"{', '.join(f'{g:+.2%}' for g in gaps)}): target within 1%: "
                      f"{'met' if abs(mean_gap) <= 0.01 else 'NOT met'}")
    return "\n".join(lines + per_seed_lines + [""] + [f"- {check}" for check in checks])


# --------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where the jobs write (inside the repo)")
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="the JSON of finished jobs")
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="*", default=list(LABELS), choices=list(LABELS))
    parser.add_argument("--width", type=int, default=128, help="hidden size of teacher and student")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--block", type=int, default=128, help="data.max_length: characters per block")
    parser.add_argument("--teacher-layers", type=int, default=6)
    parser.add_argument("--student-layers", type=int, default=2)
    parser.add_argument("--teacher-epochs", type=int, default=3)
    parser.add_argument("--student-epochs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16,
                        help="blocks per step (16 x 128 characters: about 490 steps an epoch)")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--alpha", type=float, default=0.9,
                        help="weight of the soft term (the engine's default; 1 - alpha goes to the labels)")
    parser.add_argument("--top-k", type=int, default=32)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                        help="fp32: bf16 trains these small models barely faster on a CPU")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every job")
    parser.add_argument("--quick", action="store_true", help="tiny models on a slice: a smoke run of every step")
    parser.add_argument("--table-only", action="store_true", help="only print the table of --results")
    args = parser.parse_args(argv)
    if args.quick:
        args.width, args.heads, args.block, args.teacher_layers = 32, 2, 32, 2
        args.teacher_epochs = args.student_epochs = 1
        args.seeds = [0]
        args.out = ROOT / "runs" / "lm-quick"
        args.results = args.out / "results.json"
    if "fkl" not in args.methods:
        parser.error("the fkl job trains each seed's baseline: keep fkl in --methods")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not CORPUS.exists():
        print(f"skipped: {CORPUS} is not here (../shared/data/text; see its README)")
        return 0
    out = args.out.resolve()
    results: dict[str, Any] = json.loads(args.results.read_text()) if args.results.exists() else {}
    settings = {key: getattr(args, key) for key in ("width", "heads", "block", "teacher_layers", "student_layers",
                                                    "teacher_epochs", "student_epochs", "batch", "lr", "alpha",
                                                    "top_k", "precision")}
    if results.get("settings") not in (None, settings):
        parser_error = (f"{args.results} holds results of other settings ({results['settings']}): "
                        "pass another --results (and --out), or remove it")
        print(parser_error, file=sys.stderr)
        return 2
    results.setdefault("settings", settings)
    results.setdefault("jobs", {})
    if args.table_only:
        print(table(results, args.seeds, args.methods))
        return 0
    started = time.monotonic()
    train, test = split_corpus(out)
    if args.quick:  # a slice of the corpus: every step runs, nothing is learnt
        for path, size in ((train, 60_000), (test, 8_000)):
            path.write_text(path.read_text(encoding="utf-8")[:size], encoding="utf-8")
    random_teacher = out / "random-L6.zip"
    if not random_teacher.exists():
        gpt2_zip(random_teacher, CORPUS.read_text(encoding="utf-8"), layers=args.teacher_layers, width=args.width,
                 heads=args.heads, block=args.block, seed=0)
    spec_dir = out / "specs"
    spec_dir.mkdir(parents=True, exist_ok=True)
    jobs = build_jobs(args, out, spec_dir, train, test)
    for job in jobs:
        (spec_dir / f"{job.name}.yaml").write_text(yaml.safe_dump(job.spec, sort_keys=False))
    for job in jobs:
        run(job, out, spec_dir, results, args)
    print()
    print(table(results, args.seeds, args.methods))
    print(f"(this run: {time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
