"""Resumable uploads against a real `distillery serve`, through connections that really drop.

A small TCP proxy stands between the client and the server and cuts the first connections after a
number of bytes, as a flaky network does: the server sees its client vanish mid-part, the client sees
its socket reset. Nothing is simulated inside either side.
"""

from __future__ import annotations

import contextlib
import hashlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from client import Client
from tests.client.conftest import Service

pytestmark = pytest.mark.slow


class CuttingProxy:
    """Forwards 127.0.0.1:port to the server; the first `cuts` connections die after `after` request bytes."""

    def __init__(self, upstream: int, *, cuts: int, after: int) -> None:
        self.upstream, self.cuts_left, self.after = upstream, cuts, after
        self.cut = 0
        self.sent_upstream = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                downstream, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                budget = self.after if self.cuts_left > 0 else None
                self.cuts_left -= budget is not None
            upstream = socket.create_connection(("127.0.0.1", self.upstream))
            threading.Thread(target=self._pipe, args=(downstream, upstream, budget), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, downstream, None), daemon=True).start()

    def _pipe(self, source: socket.socket, target: socket.socket, budget: int | None) -> None:
        try:
            while data := source.recv(65536):
                if budget is not None and len(data) >= budget:
                    target.sendall(data[:budget])
                    with self._lock:
                        self.cut += 1
                        self.sent_upstream += budget
                    break
                target.sendall(data)
                if budget is not None:
                    budget -= len(data)
                    with self._lock:
                        self.sent_upstream += len(data)
        except OSError:
            pass
        for end in (source, target):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)
            end.close()

    def close(self) -> None:
        self._listener.close()


@pytest.fixture
def big_dataset(tmp_path: Path) -> Path:
    """An npz of incompressible pixels, about 1.2 MB: a dozen parts of 100 kB."""
    rng = np.random.default_rng(0)
    path = tmp_path / "big.npz"
    np.savez(path, x_train=rng.integers(0, 256, (1500, 28, 28), dtype=np.uint8),
             y_train=rng.integers(0, 10, 1500), x_test=rng.integers(0, 256, (100, 28, 28), dtype=np.uint8),
             y_test=rng.integers(0, 10, 100))
    return path


@pytest.fixture
def proxy(service: Service) -> Iterator[CuttingProxy]:
    port = int(service.url.rsplit(":", 1)[1])
    cutting = CuttingProxy(port, cuts=3, after=250_000)
    yield cutting
    cutting.close()


def test_an_upload_goes_on_after_dropped_connections_from_where_the_server_stopped(
        service: Service, proxy: CuttingProxy, big_dataset: Path) -> None:
    size = big_dataset.stat().st_size
    progress: list[int] = []
    with Client(f"http://127.0.0.1:{proxy.port}", service.api_key, retries=5, backoff=0.05) as client:
        uploaded = client.upload_resumable(big_dataset, "dataset", part_bytes=100_000, on_bytes=progress.append)

    assert proxy.cut == 3  # three connections really died mid-request
    assert uploaded.size == size and uploaded.sha256 == hashlib.sha256(big_dataset.read_bytes()).hexdigest()
    assert uploaded.info["num_classes"] == 10
    assert sum(progress) == size  # every byte counted once: no part was counted twice, none lost
    with service.client() as direct:
        assert direct.get_file(uploaded.id).sha256 == uploaded.sha256
    # Nothing of the cut parts is left in the store.
    assert not list((service.data_dir).rglob(f"partial/{uploaded.id}/*"))


def test_a_part_whose_connection_drops_is_not_counted(service: Service, big_dataset: Path) -> None:
    with service.client() as client:
        created = client._send("POST", "/v1/uploads", retry="connect",
                               json={"name": "big.npz", "size": big_dataset.stat().st_size, "purpose": "dataset"})
    upload_id = created.json()["id"]
    host, port = "127.0.0.1", int(service.url.rsplit(":", 1)[1])
    body = big_dataset.read_bytes()[:300_000]
    with socket.create_connection((host, port)) as raw:
        raw.sendall((f"PATCH /v1/uploads/{upload_id} HTTP/1.1\r\nHost: {host}\r\n"
                     f"Authorization: Bearer {service.api_key}\r\nContent-Type: application/offset+octet-stream\r\n"
                     f"Upload-Offset: 0\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body[:120_000])
    # The socket is closed with 180,000 bytes of the part unsent: the server must drop what it got.
    def spooled() -> list[Path]:
        return [p for p in service.data_dir.rglob(".spool/upload-*") if p.is_file()]

    deadline = time.monotonic() + 20
    while spooled() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not spooled() and not list(service.data_dir.rglob(f"partial/{upload_id}/*"))
    with service.client() as client:
        status = client._send("GET", f"/v1/uploads/{upload_id}", retry="idempotent").json()
        assert status["offset"] == 0
        client._send("DELETE", f"/v1/uploads/{upload_id}", retry="idempotent", ok=(204,))
