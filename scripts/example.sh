#!/usr/bin/env bash
# The main job on the bundled example: works on a copy in a temporary directory, never on the original.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f dist/src/cli.js ] || npx tsc -p tsconfig.json
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp fixtures/example/disk.qcow2 "$work/disk.qcow2"
echo "== imgconv info"
./bin/imgconv info "$work/disk.qcow2"
echo "== imgconv map"
./bin/imgconv map "$work/disk.qcow2"
echo "== imgconv check"
./bin/imgconv check "$work/disk.qcow2"
