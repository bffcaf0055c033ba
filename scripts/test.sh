#!/usr/bin/env bash
# Runs the whole test suite; starts the services the tests need if they are not running.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin

"$(dirname "$0")/ensure_services.sh"
"$(dirname "$0")/ensure_browser.sh"
"$(dirname "$0")/ensure_tools.sh"
exec "$BIN/python" -m pytest -q -rs -p no:cacheprovider "$@"
