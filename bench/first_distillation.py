"""Regenerate the figures of docs/first-distillation.md: the MNIST example, run as the page runs it.

    .venv/bin/python bench/first_distillation.py           # run the example, print the figures block
    .venv/bin/python bench/first_distillation.py --write   # ... and write it into the page
    .venv/bin/python bench/first_distillation.py --check   # exit 1 where the page's figures differ

The example is `examples/mnist/`: `train_teacher.py` with its defaults, then `job.yaml` as written,
both on one CPU thread with the spec's seed, so every accuracy, parameter count and size is the
same on every run on one machine. Across processors the float rounding of the matmuls differs
(an AMD EPYC and an Intel Xeon trained teachers of 0.985 and 0.981 from the same seed), so
`--check` (and tests/docs/test_first_distillation_doc.py) hold the counts and sizes to the digit
and the accuracies and the gain to `TOLERANCE`. The speed-up is a timing and is not compared.

The block sits between the markers `<!-- figures:begin ... -->` and `<!-- figures:end -->`.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "mnist"
DOC = ROOT / "docs" / "first-distillation.md"
BEGIN = "<!-- figures:begin (written by bench/first_distillation.py --write; do not edit by hand) -->"
END = "<!-- figures:end -->"
#: The speed-up is a timing: masked where two blocks are compared.
SPEEDUP = re.compile(r"\d+(\.\d+)?× faster")
#: How far an accuracy (as a fraction) or a gain (in points / 100) may move between processors.
TOLERANCE = 0.01
_NUMBER = re.compile(r"[+-]?\d[\d,]*(?:\.\d+)?")


def run_example(workdir: Path) -> dict[str, Any]:
    """Train the example's teacher and run its job.yaml in `workdir`; the job's metrics, plus the teacher's epochs."""
    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, str(EXAMPLE))
    import train_teacher  # examples/mnist/train_teacher.py, as `python train_teacher.py` runs it

    from kdcore.pipeline import JobInputs, RunOptions, run_job
    from kdcore.spec import load_spec, resolve_local_paths

    torch.set_num_threads(1)
    model, _ = train_teacher.train(EXAMPLE / "mnist_small.npz", epochs=train_teacher.EPOCHS, seed=train_teacher.SEED)
    workdir.mkdir(parents=True, exist_ok=True)
    teacher = workdir / "teacher.safetensors"
    save_file({name: tensor.contiguous() for name, tensor in model.state_dict().items()}, str(teacher))

    spec = resolve_local_paths(load_spec(EXAMPLE / "job.yaml"), EXAMPLE)
    spec.teacher.file = str(teacher)  # the job.yaml names teacher.safetensors beside it: this run's own
    spec.threads = 1
    inputs = JobInputs(teacher=teacher, train=Path(spec.data.train))
    result = run_job(spec, inputs, RunOptions(out_dir=workdir / "out"))
    return {**result.metrics, "teacher_epochs": train_teacher.EPOCHS, "distill_epochs": spec.stages.distill_epochs,
            "seed": spec.seed}


def render(metrics: dict[str, Any]) -> str:
    """The figures block, in the page's words."""
    teacher, student, baseline = metrics["teacher"], metrics["student"], metrics["baseline"]
    low, high = metrics["distillation_gain_ci"]
    gain = metrics["distillation_gain"]
    verdict = ("within noise: the interval holds zero" if metrics["distillation_gain_within_noise"]
               else "the interval excludes zero")

    def row(name: str, entry: dict[str, Any]) -> str:
        return f"| {name} | {entry['accuracy']:.3f} | {entry['params']:,} | {entry['size_mb']:.2f} MB |"

    return "\n".join([
        f"One run of the example as written (the teacher trained for {metrics['teacher_epochs']} epochs, "
        f"{metrics['distill_epochs']} epochs of distillation and as many for the baseline, seed {metrics['seed']}, "
        f"one CPU thread), on the {metrics['eval_samples']:,} test digits:",
        "",
        "| model | test accuracy | parameters | size |",
        "| --- | --- | --- | --- |",
        row("teacher (`cnn`)", teacher),
        row("distilled student (`mlp`, 256 units)", student),
        row("baseline (the same student, no teacher)", baseline),
        "",
        f"Distillation gained {100 * gain:+.1f} points over the baseline (95% interval {100 * low:+.1f} to "
        f"{100 * high:+.1f}, {verdict}); the student is {metrics['compression']:.1f}× smaller than the teacher "
        f"and was {metrics['speedup']:.1f}× faster at batch 1 on the machine that ran this (a timing: yours "
        "will differ).",
    ])


def page_block(text: str) -> str:
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    return text[start:end].strip()


def comparable(block: str) -> str:
    return SPEEDUP.sub("N× faster", block)


def agrees(block: str, page: str) -> bool:
    """The same words and counts; accuracies and gains within TOLERANCE; the timing aside.

    A number with a sign is a gain in points; one below 1 an accuracy (or a size under a megabyte,
    which the tolerance cannot hide in practice: a parameter count beside it is held exactly).
    """
    ours, theirs = comparable(block), comparable(page)
    if _NUMBER.sub("#", ours) != _NUMBER.sub("#", theirs):
        return False
    for mine, shown in zip(_NUMBER.findall(ours), _NUMBER.findall(theirs), strict=True):
        if mine[0] in "+-" or mine.startswith("0."):
            if abs(_points(mine) - _points(shown)) > TOLERANCE + 1e-9:
                return False
        elif mine != shown:
            return False
    return True


def _points(number: str) -> float:
    """A gain (+1.2 points) or an accuracy (0.929), as a fraction."""
    value = float(number.replace(",", ""))
    return value / 100 if number[0] in "+-" else value


def write(block: str, path: Path = DOC) -> None:
    text = path.read_text(encoding="utf-8")
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    path.write_text(text[:start] + "\n" + block + "\n" + text[end:], encoding="utf-8")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--write", action="store_true", help="write the block into docs/first-distillation.md")
    action.add_argument("--check", action="store_true", help="exit 1 if the page's block differs (speed-up aside)")
    parser.add_argument("--workdir", type=Path, help="keep the teacher and the job's artifacts here")
    args = parser.parse_args()

    started = time.monotonic()
    with tempfile.TemporaryDirectory() as scratch:
        block = render(run_example(args.workdir or Path(scratch)))
    print(block)
    print(f"({time.monotonic() - started:.0f} s)", file=sys.stderr)
    if args.write:
        write(block)
    if args.check and not agrees(block, page_block(DOC.read_text(encoding="utf-8"))):
        print(f"{DOC} does not show these figures: run bench/first_distillation.py --write", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
