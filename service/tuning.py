"""Driving a tuned job's search: its trials are child jobs, Optuna decides what to try and what to prune.

The job table is the study: the parent's `tune` column holds the search's phase and outcome, each
child's `trial` column its settings and per-epoch validation metric. The Optuna study is rebuilt
from those rows for every decision (ask, prune), so a restart of the API or of any worker loses
no trial, and no process keeps a study in memory. Decisions about one search are serialised by a
write to the parent's row before anything is read (a row lock on PostgreSQL, the write lock on
SQLite), so two workers finishing trials at once cannot both start the next one.

A parent goes through three phases:

* `prepare`: a worker claims it like any job, checks the inputs and computes the teacher's logits
  once (kept in storage for every trial), then hands it to the search (`start_search`);
* `search`: the parent is `running` without a worker (`state.SEARCH_HOLDER`); trials are queued,
  at most `tune.parallel` at once and never past the owner's job limit; each finished trial
  advances the search (`advance`), and the reaper advances every search on each pass too, so a
  worker that died between finishing a trial and advancing loses nothing;
* `final`: the parent is queued again and a worker runs the full job with the best settings
  (and the baseline once), its report showing the search.

The first trial always runs the spec's own settings (the defaults), so the report can say what
the chosen settings gained over them on the validation split.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from kdcore.architectures import ARCHITECTURES
from kdcore.spec import JobSpec, TuneRange, TuneSpec
from kdcore.tune_space import apply_settings, current_value
from service import state
from service.ids import new_id
from service.models import ACTIVE_STATES, FINISHED_STATES, Job, JobFile, JobState, utcnow
from service.settings import Settings

if TYPE_CHECKING:
    import optuna

logger = logging.getLogger("distillery.tuning")

PREPARE, SEARCH, FINAL = "prepare", "search", "final"
# Student stages whose epochs are a trial's steps (teacher fine-tuning and the baseline are not).
TRIAL_STAGES = ("distill", "finetune")


@dataclass
class Advance:
    """What a step of the search decided; the caller commits, then sends `to_enqueue`."""

    to_enqueue: list[str] = field(default_factory=list)


def is_tuned(spec: dict[str, Any]) -> bool:
    return bool(spec.get("tune"))


def tune_of(spec: dict[str, Any]) -> TuneSpec:
    return TuneSpec.model_validate(spec["tune"])


def initial_state() -> dict[str, Any]:
    return {"phase": PREPARE}


def maximize(tune: TuneSpec) -> bool:
    return tune.metric == "val_accuracy"


# Settings and specs ---------------------------------------------------------------------------


def default_settings(spec: dict[str, Any], tune: TuneSpec) -> dict[str, Any]:
    """The spec's own value of every searched path (an architecture's default where the spec is silent)."""
    settings = {}
    for path in tune.space:
        value = current_value(spec, path)
        if value is None and path.startswith("student.arch_args."):
            entry = ARCHITECTURES[spec["student"]["arch"]]
            value = entry.args_model().model_dump().get(path.rsplit(".", 1)[1])
        settings[path] = value
    return settings


def trial_spec(spec: dict[str, Any], settings: dict[str, Any], *, number: int) -> dict[str, Any]:
    """A trial's job: the parent's spec with the trial's settings, `budget` of the epochs, no exports."""
    tune = tune_of(spec)
    data = apply_settings({k: v for k, v in spec.items() if k != "tune"}, settings)
    stages = dict(data.get("stages") or {})
    for key in ("distill_epochs", "finetune_epochs"):
        if stages.get(key):
            stages[key] = max(1, round(stages[key] * tune.budget))
    stages["baseline"] = False
    data.update(stages=stages, export=[], quantize="none", name=f"{spec.get('name') or 'tune'} trial {number}")
    return JobSpec.model_validate(data).model_dump(mode="json")


def final_spec(spec: dict[str, Any], best: dict[str, Any]) -> dict[str, Any]:
    """The parent's full run: the best settings, the baseline trained once beside it, no search."""
    data = apply_settings({k: v for k, v in spec.items() if k != "tune"}, best)
    data["stages"] = {**(data.get("stages") or {}), "baseline": True}
    return JobSpec.model_validate(data).model_dump(mode="json")


def shares_teacher_cache(spec: dict[str, Any]) -> bool:
    """Trials may reuse the parent's teacher logits while nothing searched changes what the teacher sees."""
    tune = tune_of(spec)
    return not any(path.startswith("data.") for path in tune.space) and not (spec.get("stages") or {}).get(
        "teacher_finetune_epochs"
    )


def _encode(value: Any) -> Any:
    # Optuna's choices are scalars; a list choice (hidden: [800, 800]) travels as its JSON text.
    return value if value is None or isinstance(value, bool | int | float | str) else json.dumps(value)


def _decode(values: list[Any] | TuneRange, encoded: Any) -> Any:
    if isinstance(values, list):
        for choice in values:
            if _encode(choice) == encoded:
                return choice
    return encoded


def _distributions(tune: TuneSpec) -> dict[str, optuna.distributions.BaseDistribution]:
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    distributions: dict[str, optuna.distributions.BaseDistribution] = {}
    for path, values in tune.space.items():
        if isinstance(values, list):
            distributions[path] = CategoricalDistribution([_encode(v) for v in values])
        elif values.integer:
            distributions[path] = IntDistribution(int(values.low), int(values.high), log=values.log,
                                                  step=int(values.step or 1))
        else:
            distributions[path] = FloatDistribution(values.low, values.high, log=values.log, step=values.step)
    return distributions


def _fits(distributions: dict[str, Any], params: dict[str, Any]) -> bool:
    try:
        return all(distributions[path]._contains(distributions[path].to_internal_repr(_encode(value)))
                   for path, value in params.items())
    except (ValueError, TypeError, KeyError):
        return False


def planned_trials(spec: dict[str, Any]) -> int:
    """How many trials the search runs: `trials`, or the defaults plus the whole grid when that is fewer."""
    tune = tune_of(spec)
    if _sampler_kind(tune) != "grid":
        return tune.trials
    grid = _grid(tune)
    defaults = default_settings(spec, tune)
    return min(tune.trials, len(grid) + (0 if defaults in grid else 1))


def _sampler_kind(tune: TuneSpec) -> str:
    if tune.sampler != "auto":
        return tune.sampler
    size = tune.grid_size()
    return "grid" if size is not None and size <= tune.trials else "tpe"


def _grid(tune: TuneSpec) -> list[dict[str, Any]]:
    paths = list(tune.space)
    choices = [values if isinstance(values, list) else [] for values in tune.space.values()]
    return [dict(zip(paths, combination, strict=True)) for combination in itertools.product(*choices)]


# The study, rebuilt from the rows --------------------------------------------------------------


def _study(spec: dict[str, Any], trials: list[Job], *, seed_offset: int) -> optuna.Study:
    import optuna
    from optuna.trial import TrialState, create_trial

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    tune = tune_of(spec)
    distributions = _distributions(tune)
    seed = int(spec.get("seed") or 0) * 1009 + seed_offset  # a fresh draw for each rebuild
    # TPE reads a trial's constraints from its system attrs (> 0: over the objective's budget).
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(5, max(2, tune.trials // 3)))
    # A trial is judged against the median of those that got further (n_startup_trials=1: a search
    # of a few trials has few to compare with).
    pruner = (optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0) if tune.prune
              else optuna.pruners.NopPruner())
    study = optuna.create_study(direction="maximize" if maximize(tune) else "minimize", sampler=sampler,
                                pruner=pruner)
    for child in trials:
        trial = child.trial or {}
        params = trial.get("params") or {}
        # A trial outside the space (the defaults may be) keeps its own one-value distributions.
        own: dict[str, optuna.distributions.BaseDistribution] = distributions if _fits(distributions, params) else {
            path: optuna.distributions.CategoricalDistribution([_encode(value)]) for path, value in params.items()}
        intermediate = {int(step): float(value) for step, value in (trial.get("intermediate") or {}).items()}
        if child.state in ACTIVE_STATES:
            trial_state, value = TrialState.RUNNING, None
        elif trial.get("pruned"):
            trial_state, value = TrialState.PRUNED, None
        elif trial.get("value") is not None:
            trial_state, value = TrialState.COMPLETE, float(trial["value"])
        else:
            trial_state, value = TrialState.FAIL, None
        study.add_trial(create_trial(
            state=trial_state, value=value, params={p: _encode(v) for p, v in params.items()}, distributions=own,
            intermediate_values=intermediate,
            system_attrs={"job_id": child.id, **({"constraints:budget": 0.0 if trial.get("feasible") else 1.0}
                                                 if tune.objective and trial.get("feasible") is not None else {})},
        ))
    return study


def _ask(spec: dict[str, Any], trials: list[Job]) -> dict[str, Any]:
    """The next trial's settings: the defaults first, then the grid in order, or TPE's proposal."""
    tune = tune_of(spec)
    tried = [(child.trial or {}).get("params") for child in trials]
    defaults = default_settings(spec, tune)
    if not trials:
        return defaults
    if _sampler_kind(tune) == "grid":
        return next(point for point in _grid(tune) if point not in tried)
    distributions = _distributions(tune)
    params: dict[str, Any] = {}
    # TPE may propose a setting already tried (few choices); draw again a few times before repeating.
    for attempt in range(8):
        study = _study(spec, trials, seed_offset=len(trials) * 31 + attempt)
        asked = study.ask(distributions)
        params = {path: _decode(tune.space[path], asked.params[path]) for path in tune.space}
        if params not in tried:
            break
    return params


def should_prune(*, session: Session, job_id: str, worker_id: str, step: int, value: float) -> bool:
    """Record a trial's validation metric after `step` epochs; True when the pruner calls it hopeless."""
    child = session.get(Job, job_id)
    if child is None or child.parent_id is None or child.worker_id != worker_id:
        return False
    trial = dict(child.trial or {})
    trial["intermediate"] = {**(trial.get("intermediate") or {}), str(step): value}
    session.execute(update(Job).where(Job.id == job_id, Job.worker_id == worker_id).values(trial=trial)
                    .execution_options(synchronize_session=False))
    session.expire(child)
    parent = session.get(Job, child.parent_id)
    if parent is None or not tune_of(parent.spec).prune:
        return False
    siblings = _children(session, parent.id)
    study = _study(parent.spec, siblings, seed_offset=0)
    frozen = next(t for t in study.get_trials(deepcopy=False) if t.system_attrs.get("job_id") == job_id)
    return bool(study.pruner.prune(study, frozen))


# Moving the search on --------------------------------------------------------------------------


def start_search(*, session: Session, settings: Settings, parent_id: str, worker_id: str,
                 teacher_cache_key: str | None) -> Advance | None:
    """The preparing worker hands the parent to its search, and the first trials are queued; None: not held."""
    if not state.hold_for_search(session, parent_id, worker_id):
        return None
    parent = session.get(Job, parent_id)
    assert parent is not None
    parent.tune = {**(parent.tune or {}), "phase": SEARCH, "planned": planned_trials(parent.spec),
                   "teacher_cache_key": teacher_cache_key}
    session.flush()
    state.append_event(session, parent_id, "log", {"message": f"searching: {parent.tune['planned']} trials"})
    return advance(session=session, settings=settings, parent_id=parent_id)


def advance(*, session: Session, settings: Settings, parent_id: str) -> Advance:
    """Record finished trials, queue the next ones, or end the search; idempotent, safe to call any time."""
    result = Advance()
    # The write comes first: it serialises every decision about this search (see the module docstring).
    locked = session.execute(
        update(Job).where(Job.id == parent_id, Job.state == JobState.RUNNING, Job.worker_id == state.SEARCH_HOLDER)
        .values(updated_at=utcnow()).execution_options(synchronize_session=False)
    )
    if locked.rowcount != 1:  # type: ignore[attr-defined]
        return result  # not searching (cancelled, already in its full run, or gone)
    parent = session.get(Job, parent_id)
    assert parent is not None
    session.refresh(parent)
    if parent.cancel_requested:
        cancel_search(session=session, parent_id=parent_id)
        return result
    tune = tune_of(parent.spec)
    children = _children(session, parent_id)
    for child in children:
        _record_outcome(session, parent, child, tune)
    planned = int((parent.tune or {}).get("planned") or planned_trials(parent.spec))
    active = [child for child in children if child.state in ACTIVE_STATES]
    done = [child for child in children if child.state in FINISHED_STATES]
    parent.progress = {"fraction": round(0.8 * len(done) / max(1, planned), 4), "epoch": len(done), "epochs": planned}
    if len(children) < planned:
        room = min(tune.parallel - len(active), planned - len(children), _free_slots(session, settings, parent))
        for _ in range(max(0, room)):
            child = _queue_trial(session, settings, parent, children)
            children.append(child)
            result.to_enqueue.append(child.id)
    elif not active:
        _end_search(session, parent, children, tune)
        if parent.state == JobState.QUEUED:
            result.to_enqueue.append(parent.id)
    session.flush()
    return result


def advance_all(*, session: Session, settings: Settings) -> list[str]:
    """The reaper's pass: advance every search (a trial may have ended with no one to advance it)."""
    parent_ids = session.scalars(
        select(Job.id).where(Job.state == JobState.RUNNING, Job.worker_id == state.SEARCH_HOLDER)
    ).all()
    to_enqueue: list[str] = []
    for parent_id in parent_ids:
        to_enqueue += advance(session=session, settings=settings, parent_id=parent_id).to_enqueue
    return to_enqueue


def cancel_search(*, session: Session, parent_id: str) -> list[str]:
    """Cancel every active trial of a parent, and the parent itself while its search holds it.

    Returns the trials cancelled while queued (their checkpoints, if any, can go).
    """
    ended = []
    for child in _children(session, parent_id):
        if child.state in ACTIVE_STATES and state.request_cancel(session, child.id) == JobState.CANCELLED:
            ended.append(child.id)
    state.finish_search(session, parent_id, state=JobState.CANCELLED, error_message="cancelled during the search")
    return ended


def _children(session: Session, parent_id: str) -> list[Job]:
    rows = session.scalars(select(Job).where(Job.parent_id == parent_id)).all()
    return sorted(rows, key=lambda job: int((job.trial or {}).get("number", 0)))


def _free_slots(session: Session, settings: Settings, parent: Job) -> int:
    """Trials count against the owner's limit of queued plus running jobs, the parent among them."""
    active = session.scalar(
        select(func.count()).select_from(Job).where(Job.owner_id == parent.owner_id, Job.state.in_(ACTIVE_STATES))
    )
    return settings.max_concurrent_jobs - int(active or 0)


def _queue_trial(session: Session, settings: Settings, parent: Job, children: list[Job]) -> Job:
    from service.jobs import spec_digest

    number = len(children)
    params = _ask(parent.spec, children)
    spec = JobSpec.model_validate(trial_spec(parent.spec, params, number=number))
    child = Job(
        id=new_id("job"), owner_id=parent.owner_id, name=spec.name, spec=spec.model_dump(mode="json"),
        spec_sha256=spec_digest(spec), queue=parent.queue, state=JobState.QUEUED, max_attempts=settings.max_attempts,
        progress={"fraction": 0.0}, parent_id=parent.id, trial={"number": number, "params": params},
    )
    session.add(child)
    inputs = session.execute(select(JobFile.role, JobFile.file_id).where(JobFile.job_id == parent.id)).all()
    session.add_all(JobFile(job_id=child.id, role=role, file_id=file_id) for role, file_id in inputs)
    session.flush()
    state.append_event(session, child.id, "state", {"state": JobState.QUEUED.value, "parent_id": parent.id})
    state.append_event(session, parent.id, "trial",
                       {"number": number, "trial_id": child.id, "state": "queued", "params": params})
    return child


def _record_outcome(session: Session, parent: Job, child: Job, tune: TuneSpec) -> None:
    """A finished trial's value (its last validation metric), pruned or not, within the budget or not."""
    trial = dict(child.trial or {})
    if child.state not in FINISHED_STATES or trial.get("recorded"):
        return
    intermediate = trial.get("intermediate") or {}
    last = intermediate[max(intermediate, key=int)] if intermediate else (child.metrics or {}).get(
        "training", {}).get(tune.metric)
    pruned = child.error_code == "pruned"
    student = (child.metrics or {}).get("student") or {}
    trial.update(
        recorded=True, state=child.state, pruned=pruned,
        value=last if child.state == JobState.SUCCEEDED else None, last_value=last,
        latency_ms=student.get("latency_ms"), params_count=student.get("params"),
        feasible=_within_budget(tune, student) if child.state == JobState.SUCCEEDED else None,
    )
    child.trial = trial
    state.append_event(session, parent.id, "trial", {
        "number": trial.get("number"), "trial_id": child.id, "state": str(child.state), "value": trial["value"],
        "pruned": pruned, "params": trial.get("params")})


def _within_budget(tune: TuneSpec, student: dict[str, Any]) -> bool:
    objective = tune.objective
    if objective is None:
        return True
    latency, params = student.get("latency_ms"), student.get("params")
    if objective.max_latency_ms is not None and (latency is None or latency > objective.max_latency_ms):
        return False
    return not (objective.max_params is not None and (params is None or params > objective.max_params))


def best_trial(trials: list[dict[str, Any]], tune: TuneSpec) -> dict[str, Any] | None:
    """The winner: completed, not pruned, within the budget; the most accurate (or lowest loss)."""
    eligible = [t for t in trials if t.get("value") is not None and not t.get("pruned") and t.get("feasible", True)]
    if not eligible:
        return None
    sign = -1.0 if maximize(tune) else 1.0
    return min(eligible, key=lambda t: (sign * float(t["value"]), int(t.get("number", 0))))


def _end_search(session: Session, parent: Job, children: list[Job], tune: TuneSpec) -> None:
    trials = [dict(child.trial or {}) for child in children]
    best = best_trial(trials, tune)
    defaults = next((t for t in trials if t.get("number") == 0), None)
    if best is None:
        reason = ("no trial's student was within the budget" if tune.objective and any(
            t.get("value") is not None for t in trials) else "every trial failed or was pruned")
        state.finish_search(session, parent.id, state=JobState.FAILED, error_code="search_failed",
                            error_message=f"{reason}; see the trials' errors, widen the space or the budget")
        parent.tune = {**(parent.tune or {}), "phase": "failed"}
        return
    gain = None
    if defaults is not None and defaults.get("value") is not None:
        gain = float(best["value"]) - float(defaults["value"])
    parent.tune = {**(parent.tune or {}), "phase": FINAL, "best": best["params"], "best_trial": best["number"],
                   "best_value": best["value"], "defaults_value": (defaults or {}).get("value"),
                   "gain_over_defaults": gain}
    session.flush()
    state.queue_final_run(session, parent.id)
    state.append_event(session, parent.id, "log", {
        "message": f"search finished: trial {best['number']} is best ({tune.metric} {best['value']:.4f}); "
                   f"the full run uses {best['params']}"})


def search_summary(parent: Any, children: Sequence[Any]) -> dict[str, Any]:
    """What the report and the API show of a search: the trials, the best, the gain over the defaults.

    `parent` and `children` are Jobs or rows with their columns (the API's status read).
    """
    tune = tune_of(parent.spec)
    rows = []
    for child in children:
        trial = child.trial or {}
        rows.append({
            "number": trial.get("number"), "job_id": child.id, "state": str(child.state),
            "params": trial.get("params") or {}, "value": trial.get("value", trial.get("last_value")),
            "pruned": bool(trial.get("pruned")) or child.error_code == "pruned",
            "epochs_run": len(trial.get("intermediate") or {}), "latency_ms": trial.get("latency_ms"),
            "params_count": trial.get("params_count"), "feasible": trial.get("feasible"),
            "started_at": child.started_at.isoformat() if child.started_at else None,
            "finished_at": child.finished_at.isoformat() if child.finished_at else None,
        })
    return {"metric": tune.metric, "phase": (parent.tune or {}).get("phase"),
            "planned": (parent.tune or {}).get("planned"), "objective": tune.objective.model_dump()
            if tune.objective else None, **{k: v for k, v in (parent.tune or {}).items()
                                           if k in ("best", "best_trial", "best_value", "defaults_value",
                                                    "gain_over_defaults")}, "trials": rows}


def trials_of(session: Session, parent_id: str) -> list[Job]:
    return _children(session, parent_id)
