#!/usr/bin/env bash
# The tree that ships, in the Debian package (/opt/edgeid) and in every update bundle (a slot):
#   bin/edgeid   Debian's python3 on lib/ (packaging/edgeid-launcher); names no path of its own
#   lib/         the edgeid wheel and its runtime dependencies (no converters, no dev tools)
#   models/      the converted models and the self-test reference
# Usage: build-tree.sh PIP WHEEL MODELS_DIR TREE
set -euo pipefail
pip=$1 wheel=$2 models=$3 tree=$4
here=$(cd "$(dirname "$0")" && pwd)

rm -rf "$tree"
mkdir -p "$tree/bin" "$tree/models"
"$pip" install --quiet --no-compile --target "$tree/lib" "$wheel"
rm -rf "$tree/lib/bin"  # console scripts naming the build machine's interpreter
install -m 0755 "$here/edgeid-launcher" "$tree/bin/edgeid"
for pattern in '*.manifest.json' '*.onnx' '*.ertree' 'selftest-*'; do
    find "$models" -maxdepth 1 -type f -name "$pattern" -exec cp {} "$tree/models/" \;
done
[ -n "$(find "$tree/models" -name '*.manifest.json')" ] \
    || { echo "no models in $models; run make models" >&2; exit 1; }
# Root's files that the service user reads: folders 0755, files 0644 (a library needs no
# execute bit), the one command 0755.
find "$tree" -type d -exec chmod 0755 {} +
find "$tree" -type f -exec chmod 0644 {} +
chmod 0755 "$tree/bin/edgeid"
