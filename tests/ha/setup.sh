#!/bin/sh
# The test suite's Home Assistant (tests/ha/requirements.txt) in its own virtual environment, apart
# from the project's: Home Assistant pins its own versions of packages the project uses too.
# tests/test_consumers.py validates the exporter's discovery configs with it (tests/ha/validate.py).
# `make test-deps` runs this; it does nothing when the environment already matches the pins.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
venv=${1:-$(cd "$here/../.." && pwd)/var/ha-venv}
requirements=$here/requirements.txt
if [ -x "$venv/bin/python" ] && cmp -s "$requirements" "$venv/requirements.txt"; then
  exit 0
fi
# Home Assistant 2025.4 needs Python 3.13: HA_PYTHON if set, else one pyenv has (uv does not look
# there), else whatever 3.13 uv finds or downloads.
python=${HA_PYTHON:-}
pyenv_root=${PYENV_ROOT:-$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")}
if [ -z "$python" ]; then
  for candidate in "$pyenv_root"/versions/3.13*/bin/python3.13; do
    [ -x "$candidate" ] && python=$candidate
  done
fi
echo "installing the test suite's Home Assistant ($requirements) into $venv"
rm -rf "$venv"
"${UV:-uv}" venv --quiet --python "${python:-3.13}" --python-preference system "$venv"
"${UV:-uv}" pip sync --quiet --python "$venv/bin/python" "$requirements"
cp "$requirements" "$venv/requirements.txt"
