"""Service overhead benchmark (issue 4): what the service adds to a job, and a burst that drains.

For each mode (embedded: `distillery serve` on SQLite and the SQLite broker; cluster: `distillery
api` + `distillery worker` on PostgreSQL and Redis), in one run:

  1. the same small job (8x8 blob images, an MLP teacher, --epochs of distillation, all three
     exports, one torch thread) run directly with `distillery distill SPEC --out DIR` (wall time
     of the command) and through the service (from `POST /v1/jobs` until `GET /v1/jobs/{id}` says
     succeeded, polled every 50 ms), alternating, --rounds times; medians compared.
     Target: service <= direct x 1.05 + 2 s.
  2. a burst of --burst small jobs submitted at once, drained by one worker; every job must end
     succeeded, with attempts 1 and exactly one `running` and one `succeeded` in its event log.

    .venv/bin/python bench/service_overhead.py [--modes embedded cluster] [--rounds 3] [--burst 50]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.e2e.stack import Stack, wait_until  # noqa: E402
from tests.support import postgres_database  # noqa: E402
from tests.worker.support import JobFiles, make_job_files, redis_database  # noqa: E402

POLL_S = 0.05
# The service's default settings (leases, polling, progress writes), as a user would run it.
BENCH_ENV = {"DISTILLERY_MAX_CONCURRENT_JOBS": "1000", "DISTILLERY_LOG_JSON": "false"}


@dataclass
class OverheadRow:
    mode: str
    direct_s: list[float]
    service_s: list[float]

    @property
    def direct(self) -> float:
        return statistics.median(self.direct_s)

    @property
    def service(self) -> float:
        return statistics.median(self.service_s)

    @property
    def met(self) -> bool:
        return self.service <= self.direct * 1.05 + 2.0


@dataclass
class BurstRow:
    mode: str
    jobs: int
    drain_s: float
    succeeded_once: int
    retried: int
    skipped_duplicates: int


def run_direct(files: JobFiles, spec: dict[str, Any], folder: Path) -> float:
    local = {**spec, "teacher": {**spec["teacher"], "file": str(files.teacher)},
             "data": {**spec["data"], "train": str(files.data)}}
    spec_path = folder / "spec.json"
    spec_path.write_text(json.dumps(local))
    out = folder / f"out-{time.monotonic_ns()}"
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "from distillery.cli import app; app()", "distill", str(spec_path), "--out",
                    str(out), "--no-progress"], check=True, cwd=REPO, capture_output=True)
    return time.perf_counter() - started


def run_service(stack: Stack, spec: dict[str, Any]) -> float:
    started = time.perf_counter()
    job_id = stack.submit(spec)
    while True:
        state = stack.job(job_id)["state"]
        if state == "succeeded":
            return time.perf_counter() - started
        if state in ("failed", "cancelled"):
            raise RuntimeError(f"job {job_id} {state}: {stack.job(job_id)['error']}")
        time.sleep(POLL_S)


def burst(stack: Stack, spec: dict[str, Any], count: int, mode: str) -> BurstRow:
    started = time.perf_counter()
    job_ids = [stack.submit(spec) for _ in range(count)]

    def drained() -> bool:
        listed = stack.http.get("/v1/jobs", params={"limit": 200}).json()["items"]
        mine = [job for job in listed if job["id"] in set(job_ids)]
        return all(job["state"] in ("succeeded", "failed", "cancelled") for job in mine) and len(mine) == count

    wait_until(drained, timeout=60 * count, what=f"{count} jobs to finish", interval=0.5)
    drain_s = time.perf_counter() - started
    succeeded_once = retried = 0
    for job_id in job_ids:
        job = stack.job(job_id)
        states = [event["state"] for event in stack.events(job_id) if event["kind"] == "state"]
        if job["state"] == "succeeded" and states.count("running") == 1 and states.count("succeeded") == 1:
            succeeded_once += 1
        retried += job["attempts"] > 1
    skipped = sum(log.count("is not queued") for log in (stack.log(name) for name in stack.processes))
    return BurstRow(mode, count, drain_s, succeeded_once, retried, skipped)


def start_mode(mode: str, root: Path, stack_exit: ExitStack) -> Stack:
    if mode == "embedded":
        stack = Stack(root / mode, fast=False, **BENCH_ENV)
        stack_exit.callback(stack.stop)
        stack.start_serve()
        stack.create_user()
        return stack
    database_url = stack_exit.enter_context(postgres_database("bench"))
    broker_url = stack_exit.enter_context(redis_database())
    stack = Stack(root / mode, database_url=database_url, broker_url=broker_url, fast=False, **BENCH_ENV)
    stack_exit.callback(stack.stop)
    stack.create_user()
    stack.start_api()
    stack.start_worker("worker", "default", "cpu")
    return stack


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", default=["embedded", "cluster"], choices=["embedded", "cluster"])
    parser.add_argument("--rounds", type=int, default=3, help="Direct/service pairs per mode.")
    parser.add_argument("--epochs", type=int, default=20, help="Distillation epochs of the measured job.")
    parser.add_argument("--burst", type=int, default=50, help="Jobs in the burst (0: none).")
    args = parser.parse_args()

    overhead: list[OverheadRow] = []
    bursts: list[BurstRow] = []
    with tempfile.TemporaryDirectory(prefix="distillery-bench-") as scratch:
        root = Path(scratch)
        files = make_job_files(root / "files")
        for mode in args.modes:
            with ExitStack() as stack_exit:
                stack = start_mode(mode, root, stack_exit)
                teacher_id = stack.upload(files.teacher, "teacher")
                data_id = stack.upload(files.data, "dataset")
                spec = files.spec(teacher_id, data_id, epochs=args.epochs, threads=1)
                run_service(stack, spec)  # warm-up: the first job pays for the database's first writes
                row = OverheadRow(mode, [], [])
                for _ in range(args.rounds):
                    row.direct_s.append(run_direct(files, spec, root))
                    row.service_s.append(run_service(stack, spec))
                overhead.append(row)
                print(f"{mode}: direct {row.direct_s}, service {row.service_s}", flush=True)
                if args.burst:
                    small = files.spec(teacher_id, data_id, epochs=2, threads=1, export=["onnx"])
                    bursts.append(burst(stack, small, args.burst, mode))
                    print(f"{mode}: burst {bursts[-1]}", flush=True)

    print()
    print("| mode | direct `distillery distill` s | through the service s | added s | added % | target |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    for row in overhead:
        added = row.service - row.direct
        print(f"| {row.mode} | {row.direct:.2f} | {row.service:.2f} | {added:+.2f} | {100 * added / row.direct:+.1f} "
              f"| {'met' if row.met else 'MISSED'} (<= x1.05 + 2 s) |")
    if bursts:
        print()
        print("| mode | burst jobs | drained in s | jobs/min | succeeded exactly once | retried | duplicate "
              "deliveries skipped |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for b in bursts:
            print(f"| {b.mode} | {b.jobs} | {b.drain_s:.1f} | {60 * b.jobs / b.drain_s:.1f} | {b.succeeded_once} "
                  f"| {b.retried} | {b.skipped_duplicates} |")
    ok = all(row.met for row in overhead) and all(b.succeeded_once == b.jobs for b in bursts)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
