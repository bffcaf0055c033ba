#!/usr/bin/env bash
# Installs Debian's Chromium for the browser tests when it is missing (Playwright drives it; it never
# downloads a browser of its own). Needs root and Debian's package lists; a machine without apt is left as it is.
set -uo pipefail
CHROMIUM="${DISTILLERY_TEST_CHROMIUM:-/usr/bin/chromium}"
if [ -x "$CHROMIUM" ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null; then
  echo "ensure_browser: no $CHROMIUM and no apt-get; the browser tests will be skipped" >&2
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  SUDO="sudo -n"
fi
echo "ensure_browser: installing chromium" >&2
$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null \
  || echo "ensure_browser: could not install chromium; the browser tests will be skipped" >&2
exit 0
