#!/usr/bin/env bash
# Installs Compose where it is missing, to validate docker-compose.yml offline (tests/deploy): the
# Docker CLI often comes without its compose plugin, so Debian's docker-compose (v1) stands in.
# `config` needs no Docker engine.
set -uo pipefail
if ! docker compose version >/dev/null 2>&1 && ! command -v docker-compose >/dev/null; then
  "$(dirname "$0")/apt_install.sh" docker-compose "tests/deploy"
fi
exit 0
