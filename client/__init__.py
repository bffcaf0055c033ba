"""Distillery's Python client: `Client` over the REST API, typed models and one error class per failure.

    from client import Client, client_from_config

    client = client_from_config()          # the server and key `distillery login` stored
    job = client.wait(client.submit("examples/mnist/job.yaml").id)

Torch-free and server-free: httpx, httpx-sse, tenacity, pydantic (and platformdirs for the config).
"""

from client import errors
from client.client import Client
from client.config import client_from_config
from client.errors import (
    AuthError,
    BadRequest,
    ChecksumError,
    Conflict,
    ConnectionError,
    DistilleryError,
    NotFound,
    RateLimited,
    ServerError,
    Timeout,
    TooLarge,
    ValidationError,
    WaitTimeout,
)
from client.models import Architecture, Artifact, File, Job, JobEvent, Progress

__all__ = [
    "Architecture",
    "Artifact",
    "AuthError",
    "BadRequest",
    "ChecksumError",
    "Client",
    "Conflict",
    "ConnectionError",
    "DistilleryError",
    "File",
    "Job",
    "JobEvent",
    "NotFound",
    "Progress",
    "RateLimited",
    "ServerError",
    "Timeout",
    "TooLarge",
    "ValidationError",
    "WaitTimeout",
    "client_from_config",
    "errors",
]
