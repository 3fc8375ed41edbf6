#!/usr/bin/env bash
# The README's test command: set up (idempotent), then run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
export STEP_ROS_REQUIRE_ROS=1  # CI has ROS from the wheels: a missing rclpy is a failure, not a skip
exec python -m pytest test -q -rs "$@"
