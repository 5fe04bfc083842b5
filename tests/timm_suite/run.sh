#!/usr/bin/env bash
# Run timm's own test_models.py (from the sdist of the installed timm) over the ssanet models.
#   bash tests/timm_suite/run.sh                                   # CI's subset (conftest.py: _CI_SUBSET)
#   SSANET_MODELS='ssanet,ssanet_*' bash tests/timm_suite/run.sh  # the full run, all 38 names
#   SSANET_MODELS='ssanet_resnet50_*,ssanet_*_plus' bash tests/timm_suite/run.sh -x
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
python="${PYTHON:-python}"
case "$python" in */*) python="$(cd "$(dirname "$python")" && pwd)/$(basename "$python")" ;; esac  # survives the cd below
version="$("$python" -c 'import timm; print(timm.__version__)')"
if [ ! -f "$here/test_models.py" ] || ! grep -q "timm==$version" "$here/.timm_version" 2>/dev/null; then
    tmp="$(mktemp -d)"
    "$python" -m pip download "timm==$version" --no-deps --no-binary :all: -q -d "$tmp"
    tar -xzf "$tmp"/timm-"$version".tar.gz -C "$tmp" "timm-$version/tests/test_models.py"
    cp "$tmp/timm-$version/tests/test_models.py" "$here/test_models.py"
    echo "timm==$version" > "$here/.timm_version"
    rm -rf "$tmp"
fi
cd "$here"
exec "$python" -m pytest -p no:cacheprovider -o addopts="" -q test_models.py "$@"
