#!/usr/bin/env bash
# The whole test suite, on a fresh machine: installs qemu-img (Debian qemu-utils) and tmux when missing,
# installs npm dependencies and builds, then runs every test. The last line is "N passed, N failed".
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
command -v qemu-img >/dev/null 2>&1 || missing+=(qemu-utils)
command -v tmux >/dev/null 2>&1 || missing+=(tmux) # the interactive view's real-terminal test
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]} (apt)" >&2
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >&2
fi
if [ ! -d node_modules ] || [ package.json -nt node_modules/.package-lock.json ]; then
  npm install --no-audit --no-fund >&2
fi
npx tsc -p tsconfig.json
IMGCONV_REQUIRE_QEMU=1 npx vitest run "$@"
