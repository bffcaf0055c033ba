"""Where the client finds its server and API key.

`distillery login URL --api-key KEY` stores both in the user's config folder
(`platformdirs.user_config_dir("distillery")/config.json`, on Linux `~/.config/distillery/`,
or `$XDG_CONFIG_HOME/distillery/`), readable by the user alone (mode 0600). The environment
overrides the file: `DISTILLERY_URL`, `DISTILLERY_API_KEY`; command-line options override both.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import platformdirs

from client.client import Client

DEFAULT_URL = "http://127.0.0.1:8000"
URL_ENV = "DISTILLERY_URL"
API_KEY_ENV = "DISTILLERY_API_KEY"


@dataclass(frozen=True)
class Login:
    url: str
    api_key: str | None
    source: str  # where the key came from: "option", "environment", a config file path, or "none"


def config_path() -> Path:
    return Path(platformdirs.user_config_dir("distillery", appauthor=False)) / "config.json"


def save_login(url: str, api_key: str, path: Path | None = None) -> Path:
    """Write {url, api_key} atomically, the file 0600 and its folder 0700 from the first byte on."""
    path = path or config_path()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=".config-", dir=path.parent)  # created 0600
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            json.dump({"url": url.rstrip("/"), "api_key": api_key}, handle, indent=2)
            handle.write("\n")
        os.chmod(temporary, 0o600)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    return path


def read_config(path: Path | None = None) -> dict[str, Any]:
    path = path or config_path()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}; run `distillery login URL --api-key KEY` again") from None
    return data if isinstance(data, dict) else {}


def resolve_login(url: str | None = None, api_key: str | None = None) -> Login:
    """Options first (the CLI passes DISTILLERY_URL / DISTILLERY_API_KEY in as options), then the env, then the file."""
    url = url or os.environ.get(URL_ENV) or None
    key_source = "option" if api_key else "environment"
    api_key = api_key or os.environ.get(API_KEY_ENV) or None
    if url and api_key:
        return Login(url.rstrip("/"), api_key, key_source)
    stored = read_config()
    stored_url = stored.get("url") if isinstance(stored.get("url"), str) else None
    stored_key = stored.get("api_key") if isinstance(stored.get("api_key"), str) else None
    if api_key is None and stored_key and (url is None or url.rstrip("/") == (stored_url or "").rstrip("/")):
        # The stored key belongs to the stored server: never send it to another one.
        api_key, key_source = stored_key, str(config_path())
    final_url = (url or stored_url or DEFAULT_URL).rstrip("/")
    return Login(final_url, api_key, key_source if api_key else "none")


def client_from_config(url: str | None = None, api_key: str | None = None, **options: Any) -> Client:
    """A Client for the server `distillery login` remembered (or the environment names)."""
    login = resolve_login(url, api_key)
    return Client(login.url, login.api_key, **options)


class ConfigError(Exception):
    pass
