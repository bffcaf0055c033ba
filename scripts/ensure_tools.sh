#!/usr/bin/env bash
# Installs Compose where it is missing, to validate docker-compose.yml offline (tests/deploy): the
# Docker CLI often comes without its compose plugin, so Debian's docker-compose (v1) stands in.
# `config` needs no Docker engine. Needs root (or sudo) and apt; elsewhere the tests skip with a reason.
set -uo pipefail
if docker compose version >/dev/null 2>&1 || command -v docker-compose >/dev/null; then
  exit 0
fi
if ! command -v apt-get >/dev/null; then
  echo "ensure_tools: no compose and no apt-get; tests/deploy will skip" >&2
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  SUDO="sudo -n"
fi
echo "ensure_tools: installing docker-compose" >&2
$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq docker-compose >/dev/null \
  || echo "ensure_tools: could not install docker-compose; tests/deploy will skip" >&2
exit 0
