"""`distillery distill SPEC --out DIR`: one whole job on this machine, without the service."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer

from kdcore.callbacks import Callbacks, Progress
from kdcore.errors import KDError, SpecError
from kdcore.spec import load_spec, resolve_local_paths

app = typer.Typer(add_completion=False, help="Distillery's local engine.")


class ProgressBar(Callbacks):
    """A tqdm bar over the whole job, with stage, epoch, ETA and the latest metrics.

    Where stderr is not a terminal (a log file, CI) a bar would be noise, so each finished epoch
    becomes one line instead (`epoch_lines`).
    """

    def __init__(self, enabled: bool, epoch_lines: bool = False) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=1000, disable=not enabled, unit="‰", bar_format=(
            "{desc} |{bar}| {percentage:3.0f}% [{elapsed}<{remaining}] {postfix}"))
        self.epoch_lines = epoch_lines and not enabled
        self.last_metrics: dict[str, float] = {}

    def on_progress(self, progress: Progress) -> None:
        epoch = f" {progress.epoch}/{progress.epochs}" if progress.epochs else ""
        self.bar.set_description_str(f"{progress.stage}{epoch}")
        self.bar.n = int(progress.fraction * 1000)
        self.last_metrics.update(progress.metrics)
        self.bar.set_postfix({k: f"{v:.4f}" for k, v in self.last_metrics.items()
                              if k in ("train_loss", "val_accuracy")}, refresh=False)
        self.bar.refresh()

    def on_epoch_end(self, progress: Progress) -> None:
        self.on_progress(progress)
        if self.epoch_lines:
            typer.echo(epoch_line(progress), err=True)

    def on_log(self, message: str) -> None:
        self.bar.write(message)

    def close(self) -> None:
        self.bar.close()


def epoch_line(progress: Progress) -> str:
    metrics = " ".join(f"{key}={value:.4g}" for key, value in sorted(progress.metrics.items()))
    eta = f" eta {progress.eta_s:.0f}s" if progress.eta_s is not None else ""
    where = f"{progress.stage} epoch {progress.epoch}/{progress.epochs} ({progress.fraction:.0%}{eta})"
    return f"{where} {metrics}".rstrip()


def distill_command(
    spec_path: Annotated[Path, typer.Argument(metavar="SPEC", help="Job spec, YAML or JSON; paths are local.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the artifacts.")] = Path("out"),
    resume: Annotated[bool, typer.Option(help="Continue from a checkpoint left in --out.")] = True,
    allow_code_teachers: Annotated[bool, typer.Option(
        "--allow-code-teachers", envvar="DISTILLERY_ALLOW_CODE_TEACHERS",
        help="Load TorchScript and torch.export teachers (they run code: only for files you trust).")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    lm_cache_dir: Annotated[Path | None, typer.Option(
        "--lm-cache-dir", envvar="DISTILLERY_LM_CACHE_DIR",
        help="causal_lm with method.top_k: keep the teacher's top-K here, so a later job of the same teacher "
        "and data trains without running it.")] = None,
    relay: Annotated[Path | None, typer.Option(hidden=True, help="A launched group's rank 0 writes its callbacks "
                                               "here as JSON lines (the worker follows them).")] = None,
    checkpoint_dir: Annotated[Path | None, typer.Option(hidden=True, help="Checkpoints here, not in --out.")] = None,
    limits_file: Annotated[Path | None, typer.Option("--limits", hidden=True,
                                                     help="The operator's ResourceLimits as JSON.")] = None,
    job_id: Annotated[str | None, typer.Option(hidden=True, help="The service's job id, for the exports.")] = None,
) -> None:
    """Distill a teacher into a student on this machine and write the artifacts to --out."""
    from kdcore.distributed import in_launched_rank, launch_command
    from kdcore.limits import ResourceLimits
    from kdcore.pipeline import JobInputs, RunOptions, run_job
    from kdcore.relay import RelayWriter, SignalCancel, cancel_on_sigterm

    writer: RelayWriter | None = None

    try:
        spec = resolve_local_paths(load_spec(spec_path), spec_path.parent)
        inputs = JobInputs(teacher=Path(spec.teacher.file), train=Path(spec.data.train),
                           test=Path(spec.data.test) if spec.data.test else None)
        for field, path in (("teacher.file", inputs.teacher), ("data.train", inputs.train),
                            ("data.test", inputs.test)):
            if path is not None and not path.is_file():
                raise KDError(f"no such file: {path}", field=field, code="bad_input")
        if spec.distributed.nproc > 1 and not in_launched_rank():
            argv = ["distill", str(spec_path.resolve()), "--out", str(out.resolve()),
                    "--resume" if resume else "--no-resume", "--progress" if progress else "--no-progress",
                    *(["--allow-code-teachers"] if allow_code_teachers else []),
                    *(["--lm-cache-dir", str(lm_cache_dir.resolve())] if lm_cache_dir else []),
                    *(["--relay", str(relay.resolve())] if relay else []),
                    *(["--checkpoint-dir", str(checkpoint_dir.resolve())] if checkpoint_dir else []),
                    *(["--limits", str(limits_file.resolve())] if limits_file else []),
                    *(["--job-id", job_id] if job_id else [])]
            # The elastic agent runs the ranks, restarts the group when one dies, and exits non-zero
            # when the group fails for good; rank 0 prints the summary.
            raise typer.Exit(subprocess.run(launch_command(spec.distributed, argv), check=False).returncode)
        callbacks: Callbacks
        if relay is not None and in_launched_rank():
            cancel_on_sigterm()
            if os.environ.get("RANK") == "0":
                callbacks = writer = RelayWriter(relay)
            else:
                callbacks = SignalCancel()
        else:
            callbacks = ProgressBar(enabled=progress and sys.stderr.isatty(), epoch_lines=progress)
        limits = (ResourceLimits.model_validate_json(limits_file.read_text()) if limits_file is not None
                  else ResourceLimits())
        options = RunOptions(out_dir=out, checkpoint_dir=checkpoint_dir, resume=resume, lm_cache_dir=lm_cache_dir,
                             allow_code_teachers=allow_code_teachers, limits=limits, job_id=job_id)
        try:
            result = run_job(spec, inputs, options, callbacks)
        finally:
            if isinstance(callbacks, ProgressBar | RelayWriter):
                callbacks.close()
    except SpecError as exc:
        for error in exc.errors:
            typer.echo(f"error: {error['field']}: {error['message']}", err=True)
        raise typer.Exit(2) from None
    except KDError as exc:
        if writer is not None:
            writer.error(exc)
        typer.echo(f"error [{exc.code}]: {exc}", err=True)
        raise typer.Exit(1) from None
    except typer.Exit:
        raise
    except Exception as exc:
        if os.environ.get("DISTILLERY_DEBUG"):
            raise
        typer.echo(f"error [internal]: {type(exc).__name__}: {exc} (set DISTILLERY_DEBUG=1 for the traceback)",
                   err=True)
        raise typer.Exit(1) from None
    metrics = result.metrics
    if not metrics:  # a rank other than 0 of a distributed job: rank 0 speaks for the group
        return
    for warning in metrics.get("warnings", []):
        typer.echo(f"warning: {warning}", err=True)
    # A language model is summed up by its loss in nats per token; a classifier by its accuracy.
    measure = "loss" if metrics.get("task") == "causal_lm" else "accuracy"
    summary = {key: metrics[key][measure] for key in ("teacher", "student", "baseline") if metrics.get(key)}
    typer.echo(json.dumps({"out": str(out), measure: summary, "compression": round(metrics["compression"], 2),
                           "speedup": round(metrics["speedup"], 2)}))


app.command("distill")(distill_command)


@app.callback()
def _group() -> None:
    """Keeps `distill` a subcommand even while it is the only one."""

if __name__ == "__main__":  # pragma: no cover
    app()
