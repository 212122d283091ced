#!/usr/bin/env bash
# Headless Chromium for the UI trigger test: Debian's package (Playwright's own browser download is not
# possible on these machines). Installs it when run as root with apt-get; otherwise says what to do.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then echo "Chromium: $(command -v chromium)"; exit 0; fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
  echo "Chromium: installing Debian's chromium package"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  command -v chromium >/dev/null && { echo "Chromium: $(command -v chromium)"; exit 0; }
fi
echo "Chromium not found: install it (Debian/Ubuntu: apt-get install -y chromium) to run the browser test;" >&2
echo "without it the browser test is skipped locally and fails under CI=true." >&2
[ -n "${CI:-}" ] && exit 1 || exit 0
