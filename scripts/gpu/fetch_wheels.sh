#!/usr/bin/env bash
# Download the wheels of scripts/gpu/wheels.txt into .whl/ (git-ignored) for the GPU machine:
# CPython 3.12, manylinux x86_64, binary only, no dependency resolution (every needed name is listed).
# The pip command is the one /work/.library/device/README.md gives for carrying wheels.
#
#   bash scripts/gpu/fetch_wheels.sh           # then carry ".whl" in the device call
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
list="$repo/scripts/gpu/wheels.txt"
dest="$repo/.whl"
mkdir -p "$dest"

platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)

# Start clean so a stale second version of a name cannot slip into the carried folder.
rm -f "$dest"/*.whl

while read -r spec rest; do
    read -ra extra <<<"$rest"  # optional extra pip flags after the spec (e.g. another --platform)
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${platforms[@]}" "${extra[@]}" -d "$dest" "$spec"
done < <(sed -e 's/#.*//' -e '/^[[:space:]]*$/d' "$list")

# One wheel per distribution name (normalised as wheel file names are: lower case, '-' -> '_').
wheels=("$dest"/*.whl)
dupes=$(for w in "${wheels[@]}"; do basename "$w"; done | cut -d- -f1 | tr 'A-Z-' 'a-z_' | sort | uniq -d)
if [[ -n "$dupes" ]]; then
    echo "two versions of: $dupes (the device's pip install --no-deps would fail)" >&2
    exit 1
fi
count=${#wheels[@]}
bytes=$(du -cb "${wheels[@]}" | tail -1 | cut -f1)
echo "fetched $count wheels into .whl/: $bytes bytes ($(( bytes / 1024 / 1024 )) MiB; the device carries 64 MiB in all)"
