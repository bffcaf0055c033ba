"""API load benchmark (issue 3): bounded, loopback only.

For each database (SQLite, the embedded default, and PostgreSQL) it starts `distillery api` (one
uvicorn process) on a fresh database, and measures with a small keep-alive HTTP/1.1 client:

  1. status polls, closed loop: 50 clients `GET /v1/jobs/{id}` for --seconds;
  2. the same against a minimal FastAPI + SQLAlchemy endpoint returning the same row from the same
     database (a second uvicorn process, same engine settings, measured in the same run): the ratio
     of (1) to (2). The minimal process also serves the row through SQLAlchemy Core on a pooled
     connection, the way the status route reads it (2b): a stricter reference, shown, not a target.
     (1), (2) and (2b) alternate in short rounds so that a neighbour's load hits them alike; each
     server's CPU time per request (from /proc) is shown too, as it moves less with that load;
  3. listing, closed loop: 50 clients `GET /v1/jobs?limit=20`;
  4. a burst of 200 submissions (50 at a time), then checks every job is in the database exactly once;
  5. open loop: status polls at a fixed 200 requests/s for --seconds, latency counted from each
     request's scheduled time (so a stall is not hidden by the client waiting).

Targets (issue 3): (2) ratio >= 0.8; (5) p99 < 50 ms; zero errors; 200 distinct jobs.

    .venv/bin/python bench/api_load.py [--seconds 8] [--databases sqlite postgresql]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CLIENTS = 50
BURST = 200
OPEN_LOOP_RATE = 200
ROUNDS = 8  # the closed-loop comparison alternates its servers in this many rounds
# An idle keep-alive connection is not reused after this long: uvicorn closes it after 5 s, and a
# request written to a connection the server has just closed fails (HTTP clients expire them too).
KEEP_ALIVE_EXPIRY = 4.0
PG_ADMIN_URL = os.environ.get("DISTILLERY_TEST_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
REDIS_URL = "redis://127.0.0.1:6379/14"


# --- the minimal comparison app ------------------------------------------------------------------


def minimal_app() -> Any:
    """FastAPI + SQLAlchemy, nothing else: sync endpoints returning the job row by id, every column,
    read through the ORM (the target's reference) or through Core (the stricter one)."""
    from fastapi import FastAPI
    from sqlalchemy import bindparam, select
    from sqlalchemy.orm import Session

    from service.db import create_db_engine
    from service.models import Job

    engine = create_db_engine(os.environ["BENCH_DATABASE_URL"])  # the API's engine settings
    app = FastAPI()
    table = Job.__table__
    by_id = select(table).where(table.c.id == bindparam("job_id"))

    @app.get("/job/{job_id}")
    def get_job(job_id: str) -> dict[str, Any]:
        with Session(engine) as session:
            job = session.get_one(Job, job_id)
            return {column.key: getattr(job, column.key) for column in Job.__table__.columns}

    @app.get("/job-core/{job_id}")
    def get_job_core(job_id: str) -> dict[str, Any]:
        with engine.connect() as connection:
            return dict(connection.execute(by_id, {"job_id": job_id}).one()._mapping)

    return app


# --- a small keep-alive HTTP/1.1 client (httpx would be the bottleneck on 2 cores) ---------------


class Connection:
    def __init__(self, port: int, headers: dict[str, str]) -> None:
        self.port = port
        self.header_block = "".join(f"{k}: {v}\r\n" for k, v in {"Host": "127.0.0.1", **headers}.items())
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, body: bytes = b"", extra: str = "") -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        assert self.reader is not None
        head = f"{method} {path} HTTP/1.1\r\n{self.header_block}{extra}Content-Length: {len(body)}\r\n\r\n"
        self.writer.write(head.encode() + body)
        status_line = await self.reader.readline()
        status = int(status_line.split()[1])
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            if name.lower() == "content-length":
                length = int(value)
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


@dataclass
class Result:
    database: str
    phase: str
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    seconds: float = 0.0
    server_cpu: float = float("nan")  # CPU seconds the server process used during the phase
    round_rates: list[float] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.seconds if self.seconds else 0.0

    @property
    def cpu_ms(self) -> float:
        """Server CPU time per request, in ms."""
        return self.server_cpu / len(self.latencies) * 1000 if self.latencies else float("nan")

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000 if ordered else float("nan")


async def closed_loop(
    port: int, headers: dict[str, str], paths: Callable[[int], str], seconds: float, result: Result
) -> None:
    deadline = time.perf_counter() + seconds

    async def client(index: int) -> None:
        connection = Connection(port, headers)
        try:
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                try:
                    status, _ = await connection.request("GET", paths(index))
                except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
                    result.errors += 1
                    connection.close()
                    connection = Connection(port, headers)
                    continue
                result.latencies.append(time.perf_counter() - started)
                result.errors += status != 200
        finally:
            connection.close()

    started = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(CLIENTS)))
    result.seconds = time.perf_counter() - started


async def open_loop(port: int, headers: dict[str, str], path: str, rate: int, seconds: float, result: Result) -> None:
    idle: list[tuple[float, Connection]] = []  # (last used, connection), the most recent last
    start = time.perf_counter()

    def take() -> Connection:
        while idle:
            used, connection = idle.pop()
            if time.perf_counter() - used < KEEP_ALIVE_EXPIRY:
                return connection
            connection.close()
        return Connection(port, headers)

    async def one(scheduled: float) -> None:
        connection = take()
        try:
            status, _ = await connection.request("GET", path)
            result.errors += status != 200
            idle.append((time.perf_counter(), connection))
        except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
            result.errors += 1
            connection.close()
            return
        result.latencies.append(time.perf_counter() - scheduled)

    tasks = []
    for i in range(int(rate * seconds)):
        scheduled = start + i / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(scheduled)))
    await asyncio.gather(*tasks)
    result.seconds = time.perf_counter() - start
    for _, connection in idle:
        connection.close()


async def burst(port: int, headers: dict[str, str], spec: dict[str, Any], run_id: str, result: Result) -> list[str]:
    created: list[str] = []
    pending = list(range(BURST))

    async def client() -> None:
        connection = Connection(port, {**headers, "Content-Type": "application/json"})
        while pending:
            index = pending.pop()
            body = json.dumps({**spec, "name": f"burst-{index}"}).encode()
            started = time.perf_counter()
            try:
                status, response = await connection.request(
                    "POST", "/v1/jobs", body, extra=f"Idempotency-Key: {run_id}-{index}\r\n"
                )
            except (OSError, asyncio.IncompleteReadError, ValueError):
                result.errors += 1
                connection = Connection(port, {**headers, "Content-Type": "application/json"})
                continue
            result.latencies.append(time.perf_counter() - started)
            if status == 201:
                created.append(json.loads(response)["id"])
            else:
                result.errors += 1
        connection.close()

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(CLIENTS)))
    result.seconds = time.perf_counter() - started
    return created


# --- servers and data ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start(command: list[str], env: dict[str, str], port: int, log: Path) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=REPO)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return process
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("server did not start")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads (Linux /proc; NaN elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()


def database_env(database: str, workdir: Path) -> tuple[dict[str, str], Callable[[], None]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISTILLERY_")}
    env.update(
        {
            "DISTILLERY_DATA_DIR": str(workdir),
            "DISTILLERY_MAX_CONCURRENT_JOBS": "1000000",
            "DISTILLERY_LOG_LEVEL": os.environ.get("BENCH_LOG_LEVEL", "INFO"),
            "PYTHONPATH": str(REPO),
        }
    )
    if database == "sqlite":
        return env, lambda: None
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = f"distillery_bench_{secrets.token_hex(4)}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    env["DISTILLERY_DATABASE_URL"] = make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    if _redis_up():
        env["DISTILLERY_BROKER_URL"] = REDIS_URL  # the cluster pairing: PostgreSQL + Redis

    def drop() -> None:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    return env, drop


def _redis_up() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 6379), timeout=0.5):
            return True
    except OSError:
        return False


def seed(base: str, headers: dict[str, str], jobs: int) -> tuple[dict[str, Any], list[str]]:
    """Upload a real teacher and dataset, then submit `jobs` jobs; returns the spec and the job ids."""
    from tests.api.factories import npz_bytes, safetensors_bytes

    with httpx.Client(base_url=base, headers=headers, timeout=30) as client:
        teacher = client.post(
            "/v1/files", data={"purpose": "teacher"}, files={"file": ("t.safetensors", safetensors_bytes())}
        ).json()["id"]
        train = client.post("/v1/files", data={"purpose": "dataset"}, files={"file": ("d.npz", npz_bytes())}).json()[
            "id"
        ]
        spec = {
            "teacher": {"file": teacher, "arch": "mlp", "arch_args": {"hidden": [32]}},
            "data": {"train": train},
            "student": {"arch": "mlp", "arch_args": {"hidden": [16]}},
        }
        ids = [client.post("/v1/jobs", json=spec).json()["id"] for _ in range(jobs)]
    return spec, ids


def count_burst_jobs(database_url: str, run_id: str) -> tuple[int, int]:
    from sqlalchemy import func, select

    from service.db import create_db_engine
    from service.models import Job

    engine = create_db_engine(database_url)
    with engine.connect() as connection:
        keys = select(Job.idempotency_key).where(Job.idempotency_key.like(f"{run_id}-%"))
        total = connection.execute(select(func.count()).select_from(keys.subquery())).scalar_one()
        distinct = connection.execute(
            select(func.count(func.distinct(Job.idempotency_key))).where(Job.idempotency_key.like(f"{run_id}-%"))
        ).scalar_one()
    engine.dispose()
    return int(total), int(distinct)


def run_database(database: str, seconds: float, workdir: Path, client_cpu: list[float]) -> list[Result]:
    env, cleanup = database_env(database, workdir)
    python = sys.executable
    results: list[Result] = []
    try:
        created = subprocess.run(
            [python, "-m", "distillery.cli", "admin", "create-user", "bench"],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        )
        key = created.stdout.split()[-1]
        headers = {"Authorization": f"Bearer {key}"}
        from service.settings import Settings

        database_url = Settings(_env_file=None, **_settings_from(env)).database_url  # type: ignore[call-arg]

        api_port, minimal_port = free_port(), free_port()
        api_server = start(
            [python, "-m", "distillery.cli", "api", "--port", str(api_port)], env, api_port, workdir / "api.log"
        )
        minimal_server = start(
            [
                python,
                "-m",
                "uvicorn",
                "--factory",
                "bench.api_load:minimal_app",
                "--port",
                str(minimal_port),
                "--log-level",
                "warning",
                "--no-access-log",
            ],
            {**env, "BENCH_DATABASE_URL": database_url},
            minimal_port,
            workdir / "minimal.log",
        )
        try:
            spec, job_ids = seed(f"http://127.0.0.1:{api_port}", headers, jobs=50)
            poll_id = job_ids[0]
            pids = {api_port: api_server.pid, minimal_port: minimal_server.pid}

            def measure(phase: str, port: int, path: Callable[[int], str], auth: bool, duration: float) -> Result:
                result = Result(database, phase)
                cpu, client = cpu_seconds(pids[port]), time.process_time()
                asyncio.run(closed_loop(port, headers if auth else {}, path, duration, result))
                result.server_cpu = cpu_seconds(pids[port]) - cpu
                client_cpu.append((time.process_time() - client) / result.seconds)
                return result

            comparison = (
                (Result(database, "minimal endpoint: GET /job/{id}", server_cpu=0.0), minimal_port, "/job/", False),
                (
                    Result(database, "minimal endpoint over Core: GET /job-core/{id}", server_cpu=0.0),
                    minimal_port,
                    "/job-core/",
                    False,
                ),
                (Result(database, "status poll: GET /v1/jobs/{id}", server_cpu=0.0), api_port, "/v1/jobs/", True),
            )

            def cycling(prefix: str) -> Callable[[int], str]:
                return lambda i: f"{prefix}{job_ids[i % 50]}"

            for _, port, prefix, auth in comparison:
                measure("warmup", port, cycling(prefix), auth, 1.0)
            # Alternate them in short rounds, so a neighbour's load on the machine hits them alike.
            for _ in range(ROUNDS):
                for total, port, prefix, auth in comparison:
                    part = measure(total.phase, port, cycling(prefix), auth, seconds / ROUNDS)
                    total.latencies += part.latencies
                    total.errors += part.errors
                    total.seconds += part.seconds
                    total.server_cpu += part.server_cpu
                    total.round_rates.append(part.rate)
            for total, *_ in comparison:
                results.append(total)
                print(_row(total), flush=True)
            listing = measure("listing: GET /v1/jobs?limit=20", api_port, lambda i: "/v1/jobs?limit=20", True, seconds)
            results.append(listing)
            print(_row(listing), flush=True)

            burst_result = Result(database, f"burst: {BURST} x POST /v1/jobs")
            run_id = secrets.token_hex(4)
            cpu = cpu_seconds(api_server.pid)
            asyncio.run(burst(api_port, headers, spec, run_id, burst_result))
            burst_result.server_cpu = cpu_seconds(api_server.pid) - cpu
            stored, distinct = count_burst_jobs(database_url, run_id)
            burst_result.errors += (stored != BURST) + (distinct != BURST)
            results.append(burst_result)
            print(_row(burst_result), f"(jobs in database: {stored}, distinct: {distinct})", flush=True)

            open_result = Result(database, f"open loop: {OPEN_LOOP_RATE} polls/s")
            cpu = cpu_seconds(api_server.pid)
            asyncio.run(open_loop(api_port, headers, f"/v1/jobs/{poll_id}", OPEN_LOOP_RATE, seconds, open_result))
            open_result.server_cpu = cpu_seconds(api_server.pid) - cpu
            results.append(open_result)
            print(_row(open_result), flush=True)
        finally:
            stop(api_server)
            stop(minimal_server)
    finally:
        cleanup()
    return results


def _settings_from(env: dict[str, str]) -> dict[str, str]:
    prefix = "DISTILLERY_"
    wanted = ("DATA_DIR", "DATABASE_URL")
    return {k[len(prefix) :].lower(): v for k, v in env.items() if k.startswith(prefix) and k[len(prefix) :] in wanted}


def _row(result: Result) -> str:
    return (
        f"| {result.database} | {result.phase} | {len(result.latencies)} | {result.rate:,.0f} | "
        f"{result.percentile(0.5):.1f} | {result.percentile(0.99):.1f} | {result.cpu_ms:.2f} | {result.errors} |"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=8.0, help="Length of each timed phase.")
    parser.add_argument("--databases", nargs="+", default=["sqlite", "postgresql"], choices=["sqlite", "postgresql"])
    args = parser.parse_args()

    print(f"{CLIENTS} clients, {args.seconds:.0f} s a phase, one uvicorn process, loopback, {os.cpu_count()} CPUs")
    print(f"load average at the start: {_load_average()}\n")
    print("| database | phase | requests | req/s | p50 ms | p99 ms | server CPU ms/req | errors |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    all_results: list[Result] = []
    client_cpu: list[float] = []
    for database in args.databases:
        with tempfile.TemporaryDirectory(prefix=f"distillery-bench-{database}-") as workdir:
            all_results += run_database(database, args.seconds, Path(workdir), client_cpu)

    print()
    ok = True
    for database in args.databases:
        phases = {r.phase.split(":")[0]: r for r in all_results if r.database == database}
        polls, minimal, core = phases["status poll"], phases["minimal endpoint"], phases["minimal endpoint over Core"]
        ratio = polls.rate / minimal.rate
        open_p99 = phases["open loop"].percentile(0.99)
        errors = sum(r.errors for r in all_results if r.database == database)
        passed = ratio >= 0.8 and open_p99 < 50 and errors == 0
        ok &= passed
        print(
            f"{database}: status-poll throughput {ratio:.2f}x the minimal endpoint (target >= 0.8; "
            f"{_round_ratio(polls, minimal):.2f}x the median round; server CPU per request "
            f"{minimal.cpu_ms / polls.cpu_ms:.2f}x); open-loop p99 {open_p99:.1f} ms (target < 50); "
            f"errors {errors} -> {'PASS' if passed else 'FAIL'}"
        )
        print(
            f"  stricter reference, the minimal endpoint over Core: {polls.rate / core.rate:.2f}x its throughput "
            f"({_round_ratio(polls, core):.2f}x the median round), server CPU per request "
            f"{core.cpu_ms / polls.cpu_ms:.2f}x"
        )
    print(
        f"load generator: {statistics.median(client_cpu):.2f} CPUs (median of the closed-loop phases); "
        f"load average at the end: {_load_average()}"
    )
    return 0 if ok else 1


def _round_ratio(result: Result, reference: Result) -> float:
    return statistics.median(a / b for a, b in zip(result.round_rates, reference.round_rates, strict=True))


def _load_average() -> str:
    try:
        return ", ".join(f"{load:.1f}" for load in os.getloadavg())
    except OSError:
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
