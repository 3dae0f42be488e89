#!/usr/bin/env bash
# What the browser side needs: onnxruntime-web and playwright-core from the npm registry, at the
# versions web/package-lock.json pins, and Debian's Chromium for the browser tests. Best effort:
# where npm or apt is missing or offline it says so and exits 0; `edgetune export --web` then
# says what to install, and the browser tests skip, naming what is missing. Marks success in
# web/node_modules/.installed, so `make` does this once.
set -uo pipefail
cd "$(dirname "$0")/.."
ok=1
if command -v npm >/dev/null; then
  npm ci --prefix web --no-audit --no-fund --loglevel=error || { echo "note: npm ci --prefix web failed" >&2; ok=0; }
else
  echo "note: npm is not installed: no onnxruntime-web for \`edgetune export --web\`, and no browser tests" >&2; ok=0
fi
chromium="${CHROMIUM:-/usr/bin/chromium}"
if [ ! -x "$chromium" ]; then
  sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo -n"
  if command -v apt-get >/dev/null && { $sudo true 2>/dev/null || [ -z "$sudo" ]; }; then
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get install -y -q chromium >/dev/null 2>&1 ||
      { $sudo apt-get update -q >/dev/null 2>&1 && $sudo apt-get install -y -q chromium >/dev/null 2>&1; } ||
      { echo "note: apt-get could not install chromium: the browser tests will skip" >&2; ok=0; }
  else
    echo "note: no Chromium at $chromium and no apt-get to install it: the browser tests will skip" >&2; ok=0
  fi
fi
[ "$ok" = 1 ] && touch web/node_modules/.installed
exit 0
