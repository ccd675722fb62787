#!/usr/bin/env bash
# Print the path of a Python >= 3.12: first on PATH, then under ~/.pyenv/versions/.
set -u
new_enough() {
    "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' 2>/dev/null
}
for name in python3.13 python3.12 python3; do
    candidate=$(command -v "$name" 2>/dev/null) || continue
    if new_enough "$candidate"; then echo "$candidate"; exit 0; fi
done
for candidate in $(ls -d "$HOME"/.pyenv/versions/3.*/bin/python3 2>/dev/null | sort -V); do
    if new_enough "$candidate"; then echo "$candidate"; exit 0; fi
done
echo "error: femeta needs Python >= 3.12 and none was found on PATH or under ~/.pyenv/versions/;" \
     "install one (e.g. 'pyenv install 3.12') or put python3.12 on PATH" >&2
exit 1
