"""The API with the browser interface mounted, for the web tests while `create_app` does not mount it itself.

`python -m tests.web.server --port P` migrates the database and serves the app like `distillery api`;
once `api.main.create_app` calls `mount_web`, this adds nothing (the web is mounted once).
"""

from __future__ import annotations

import argparse

from fastapi import FastAPI

from api.main import create_app
from api.web import mount_web


def web_is_mounted(app: FastAPI) -> bool:
    return any(getattr(route, "path", None) == "/web/login" for route in app.routes)


def create_web_app() -> FastAPI:
    app = create_app()
    if not web_is_mounted(app):
        mount_web(app)
    return app


def main() -> None:
    import uvicorn

    from api.migrate import upgrade_to_head
    from api.observability import configure_logging
    from api.settings import get_settings

    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    settings = get_settings()
    configure_logging(settings.log_level, json_lines=settings.log_json)
    upgrade_to_head(settings)
    uvicorn.run("tests.web.server:create_web_app", factory=True, host=args.host, port=args.port, log_config=None,
                access_log=False, timeout_graceful_shutdown=5)


if __name__ == "__main__":
    main()
