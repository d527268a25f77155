#!/usr/bin/env bash
# The main job on the bundled example, on a copy in a temporary directory (never the original):
# inspect a qcow2 image, plan and run an in-place conversion to QED, and back to qcow2 when that
# target is available; qemu-img, when installed, judges the result.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f dist/src/cli.js ] || npx tsc -p tsconfig.json
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
img="$work/disk.qcow2"
cp fixtures/example/disk.qcow2 "$img"
cp fixtures/example/disk.qcow2 "$work/original.qcow2"
run() { echo "\$ imgconv $*"; ./bin/imgconv "$@"; echo; }
run info "$img"
run plan --to qed "$img"
run inplace --to qed "$img"
run check "$img"
if command -v qemu-img >/dev/null 2>&1; then
  echo "\$ qemu-img compare original.qcow2 disk.qcow2 (now QED)"
  qemu-img compare -f qcow2 -F qed "$work/original.qcow2" "$img"
  echo "\$ qemu-img check disk.qcow2"
  qemu-img check -f qed "$img" || true
  echo
fi
if ./bin/imgconv plan --to qcow2 "$img" >/dev/null 2>&1; then
  run inplace --to qcow2 "$img"
  if command -v qemu-img >/dev/null 2>&1; then
    echo "\$ qemu-img compare original.qcow2 disk.qcow2 (qcow2 again)"
    qemu-img compare -f qcow2 -F qcow2 "$work/original.qcow2" "$img"
  fi
fi
