#!/usr/bin/env bash
# Installs Debian's Chromium for the browser tests when it is missing (Playwright drives it; it never
# downloads a browser of its own).
set -uo pipefail
CHROMIUM="${DISTILLERY_TEST_CHROMIUM:-/usr/bin/chromium}"
[ -x "$CHROMIUM" ] || "$(dirname "$0")/apt_install.sh" chromium "the browser tests"
exit 0
