#!/usr/bin/env bash
# Set up everything step_ros needs in ./.venv, from nothing: Python deps (pinned), ROS 2 from
# the Python package index, and the project's rosidl messages. Idempotent: a second run only
# checks. Usage: bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $PYTHON"
  "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate

stamp=.venv/.step_ros_requirements
want=$(cat requirements.txt setup.py | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing Python dependencies (requirements.txt)"
  python -m pip install -q --upgrade pip
  python -m pip install -q -r requirements.txt
  python -m pip install -q --no-deps -e .
  echo "$want" > "$stamp"
else
  echo "[setup] Python dependencies up to date"
fi

bash scripts/setup_ros.sh
echo "[setup] done: activate with '. .venv/bin/activate'"
