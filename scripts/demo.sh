#!/usr/bin/env bash
# The README's main-job command: set up (idempotent), then run the built-in demo.
#   bash scripts/demo.sh            live: demo bag -> ROS 2 node over DDS -> /human_action
#   bash scripts/demo.sh --offline  no ROS: evaluate the demo model on a fresh synthetic test set
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
exec python -m step_ros demo "$@"
