#!/usr/bin/env bash
# apt_install.sh PACKAGE WHAT: installs a Debian package a test group needs, if apt can; never fails,
# so a machine without apt or root just skips WHAT (its tests say why).
set -uo pipefail
package="$1" what="$2"
if ! command -v apt-get >/dev/null; then
  echo "$package: not installed and no apt-get; $what will be skipped" >&2
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  SUDO="sudo -n"
fi
echo "installing $package for $what" >&2
$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$package" >/dev/null \
  || echo "$package: could not be installed; $what will be skipped" >&2
exit 0
