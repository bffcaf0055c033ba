"""service.queue sends `distillery.run_job(job_id)` through real brokers: the embedded one and Redis."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from kombu import Connection

from service.queue import TASK_NAME, enqueue_job
from service.settings import Settings


def _received(broker_url: str, queue: str) -> list[tuple[str, list[str]]]:
    with Connection(broker_url) as connection:
        simple = connection.SimpleQueue(queue)
        messages = []
        try:
            while True:
                message = simple.get(timeout=1.0)
                body = message.body if isinstance(message.body, dict | list) else json.loads(message.body)
                messages.append((message.headers["task"], body[0]))
                message.ack()
        except simple.Empty:
            pass
        finally:
            simple.close()
    return messages


def test_enqueue_job_embedded_sqlite_broker(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    assert settings.broker_url.startswith("sqla+sqlite:///")
    enqueue_job("job_a", settings=settings, queue="default")
    assert _received(settings.broker_url, "default") == [(TASK_NAME, ["job_a"])]


def test_enqueue_job_redis(tmp_path: Path) -> None:
    url = os.environ.get("DISTILLERY_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
    try:
        import redis

        redis.Redis.from_url(url, socket_connect_timeout=1).ping()
    except Exception as exc:
        pytest.skip(f"Redis is not reachable at {url}: {exc}")
    queue = f"test-{uuid.uuid4().hex[:8]}"
    enqueue_job("job_b", settings=Settings(data_dir=tmp_path, broker_url=url), queue=queue)
    assert _received(url, queue) == [(TASK_NAME, ["job_b"])]


def test_enqueue_job_broker_down_raises_fast(tmp_path: Path) -> None:
    import time

    started = time.monotonic()
    with pytest.raises(Exception):
        enqueue_job("job_c", settings=Settings(data_dir=tmp_path, broker_url="redis://127.0.0.1:1/0"), queue="default")
    assert time.monotonic() - started < 10


def test_import_api_never_imports_torch() -> None:
    code = (
        "import sys\n"
        "import api.main, distillery.cli, service.state, service.storage, service.queue\n"
        "import kdcore.teacher_sniff, kdcore.data_sniff\n"  # the upload checks the API calls
        "from api.main import create_app\n"
        "from service.settings import Settings\n"
        "import tempfile; create_app(Settings(data_dir=tempfile.mkdtemp()))\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
