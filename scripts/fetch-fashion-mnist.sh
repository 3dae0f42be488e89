#!/usr/bin/env bash
# Fetch Fashion-MNIST from Debian's `dataset-fashion-mnist` package into $1 (no root needed:
# the .deb is downloaded and unpacked, not installed). Best effort: where apt is missing or
# offline it says so and exits 0, and edgetune falls back to data a Python package ships.
set -uo pipefail
dest="$1"
files="train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz"
for dir in /usr/share/datasets/fashion-mnist "$dest"; do
  if [ -f "$dir/t10k-labels-idx1-ubyte.gz" ]; then exit 0; fi
done
tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
if ! command -v apt-get >/dev/null || ! (cd "$tmp" && timeout 300 apt-get download -q dataset-fashion-mnist >/dev/null 2>&1); then
  echo "note: could not fetch Debian's dataset-fashion-mnist; edgetune will use scikit-learn's digits instead" >&2
  exit 0
fi
dpkg-deb -x "$tmp"/dataset-fashion-mnist_*.deb "$tmp/root"
mkdir -p "$dest"
for f in $files; do cp "$tmp/root/usr/share/datasets/fashion-mnist/$f" "$dest/"; done
echo "Fashion-MNIST in $dest"
