"""End-to-end fixtures: the job files and a cluster-style service (PostgreSQL, Redis, an API and
two workers as real processes). Every test here is marked `e2e` (`pytest -m e2e` selects them)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.stack import Stack, running
from tests.support import postgres_database
from tests.worker.support import JobFiles, make_job_files, redis_database


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.path).parents:
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def job_files(tmp_path_factory: pytest.TempPathFactory) -> JobFiles:
    """600 training images: a job of a few epochs takes about a second."""
    return make_job_files(tmp_path_factory.mktemp("job-files"))


@pytest.fixture(scope="session")
def long_job_files(tmp_path_factory: pytest.TempPathFactory) -> JobFiles:
    """3200 training images (100 steps an epoch): long enough to stop a job in the middle."""
    return make_job_files(tmp_path_factory.mktemp("long-job-files"), num_train=4000)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """`distillery api` and two `distillery worker` processes on PostgreSQL and Redis."""
    with postgres_database("e2e") as database_url, redis_database() as broker_url:
        stack = Stack(tmp_path_factory.mktemp("cluster"), database_url=database_url, broker_url=broker_url)
        with running(stack):
            stack.create_user()
            stack.start_api()
            stack.start_worker("worker-1")
            stack.start_worker("worker-2")
            yield stack
