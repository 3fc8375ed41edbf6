#!/usr/bin/env bash
# Install ROS 2 (Kilted, Fast DDS) from Python wheels into the active venv and build the
# step_ros messages (msg/*.msg) into it, so that
#     from step_ros.msg import HumanAction, TaskPrediction, LabelScore
# works in the venv with no manual step.  Usage (venv active):
#     bash scripts/setup_ros.sh            # idempotent; a second run takes a second or two
#     STEP_ROS_FORCE=1 bash scripts/setup_ros.sh   # reinstall the wheels check + rebuild
# Steps:
#   1. pip install -r requirements-ros.txt (skipped when every pin is already installed);
#   2. rewrite the Python / numpy include dirs baked into the wheels' exported CMake
#      targets (they name the manylinux build machine's /opt/python/...) to this venv's;
#   3. cmake configure / build / install with -DSTEP_ROS_MESSAGES_ONLY=ON into the venv
#      prefix (build dir build/msgs), skipped when msg/*.msg, CMakeLists.txt, package.xml,
#      requirements-ros.txt and this script are unchanged since the last successful build.
# See docs/ROS.md.
set -Eeuo pipefail

log() { printf 'setup_ros: %s\n' "$*" >&2; }
die() { printf 'setup_ros: ERROR: %s\n' "$*" >&2; exit 1; }
# shellcheck disable=SC2154  # rc is assigned inside the trap string
trap 'rc=$?; printf "setup_ros: ERROR: command failed (exit %s) at line %s: %s\n" "$rc" "$LINENO" "$BASH_COMMAND" >&2' ERR

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD_DIR="$ROOT/build/msgs"
LOGS="$ROOT/build/msgs-logs"   # outside build/msgs, which may be wiped
REQS="$ROOT/requirements-ros.txt"

[ -n "${VIRTUAL_ENV:-}" ] || die "no venv is active: run '. .venv/bin/activate' first (VIRTUAL_ENV is unset)"
PREFIX="$(cd "$VIRTUAL_ENV" && pwd)"
PY="$PREFIX/bin/python"
[ -x "$PY" ] || die "$PY not found or not executable: is VIRTUAL_ENV=$VIRTUAL_ENV a venv?"
[ -f "$REQS" ] || die "$REQS is missing"
for tool in cmake cc c++; do
  command -v "$tool" >/dev/null 2>&1 || die "'$tool' not found: install cmake (>= 3.16) and a C/C++ compiler (apt-get install cmake build-essential)"
done

t_start=$SECONDS

# --- 1. ROS 2 wheels -------------------------------------------------------------------
# True (exit 0) when every 'name==version' pin and every bare name of requirements-ros.txt
# is installed; prints what is missing otherwise.  Much faster than a no-op pip install.
reqs_satisfied() {
  "$PY" - "$REQS" <<'PYEOF'
import re, sys
from importlib import metadata
missing = []
for line in open(sys.argv[1], encoding="utf-8"):
    line = line.split("#", 1)[0].strip()
    if not line:
        continue
    m = re.fullmatch(r"([A-Za-z0-9_.\-]+)\s*(?:==\s*(\S+))?", line)
    if not m:
        sys.exit(f"unsupported requirement line: {line!r}")
    name, want = m.groups()
    try:
        have = metadata.version(name)
    except metadata.PackageNotFoundError:
        missing.append(name)
        continue
    if want and have != want:
        missing.append(f"{name} ({have} != {want})")
if missing:
    print("not installed: " + ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else ""),
          file=sys.stderr)
    sys.exit(1)
PYEOF
}

if [ -z "${STEP_ROS_FORCE:-}" ] && reqs_satisfied 2>/dev/null; then
  log "ROS 2 wheels: all pins of requirements-ros.txt already installed"
else
  reqs_satisfied || true
  log "ROS 2 wheels: pip install -r requirements-ros.txt"
  "$PY" -m pip install -q --disable-pip-version-check -r "$REQS" \
    || die "pip install -r requirements-ros.txt failed (see above)"
  reqs_satisfied || die "requirements-ros.txt still not satisfied after pip install"
  log "ROS 2 wheels: installed in $((SECONDS - t_start)) s"
fi

# Environment the wheels expect.  Every Python process of the venv re-executes itself once
# (ros_wheels_bootstrapper.pth) to put the venv's lib/ and the ros_*.libs folders on
# LD_LIBRARY_PATH; take that value once and mark the bootstrap done so that the many
# Python processes of the build below do not each re-execute.
LD_LIBRARY_PATH="$(cd / && "$PY" -c 'import os; print(os.environ.get("LD_LIBRARY_PATH", ""))')" \
  || die "the venv's python does not start"
export LD_LIBRARY_PATH
export _ROS_WHEELS_BOOTSTRAP_COMPLETE=1
export AMENT_PREFIX_PATH="$PREFIX${AMENT_PREFIX_PATH:+:$AMENT_PREFIX_PATH}"
export CMAKE_PREFIX_PATH="$PREFIX${CMAKE_PREFIX_PATH:+:$CMAKE_PREFIX_PATH}"

# --- 2. CMake include-path quirk --------------------------------------------------------
# The wheels' exported targets (share/<pkg>/cmake/*Export.cmake) carry the include dirs of
# the machine that built them: /opt/python/cp311-cp311/include/python3.11 and its numpy
# include dir.  Point them at this interpreter's and this venv's numpy.  Idempotent.
"$PY" - "$PREFIX" <<'PYEOF'
import os, re, sys, sysconfig
from pathlib import Path
prefix = Path(sys.argv[1])
py_inc = sysconfig.get_paths()["include"]
if not os.path.isfile(os.path.join(py_inc, "Python.h")):
    sys.exit(f"setup_ros: ERROR: Python.h not found in {py_inc}: install this Python's "
             "development headers (e.g. apt-get install python3.11-dev)")
try:
    import numpy
except ImportError:
    sys.exit("setup_ros: ERROR: numpy is not installed in the venv")
np_inc = numpy.get_include()
# absolute paths inside a quoted, ';'-separated CMake list
py_re = re.compile(r'(?<=[";])/[^";\s]*/include/python\d+\.\d+[a-z]*(?=[";])')
np_re = re.compile(r'(?<=[";])/[^";\s]*/numpy/(?:_core|core)/include(?=[";])')
changed = 0
for f in sorted(prefix.glob("share/*/cmake/*.cmake")):
    text = f.read_text(encoding="utf-8", errors="surrogateescape")
    if "INTERFACE_INCLUDE_DIRECTORIES" not in text:
        continue
    new = np_re.sub(lambda m: np_inc, py_re.sub(lambda m: py_inc, text))
    if new != text:
        f.write_text(new, encoding="utf-8", errors="surrogateescape")
        changed += 1
print(f"setup_ros: CMake include dirs -> {py_inc}, {np_inc} "
      f"({changed} file(s) rewritten)", file=sys.stderr)
PYEOF

# --- 3. Build and install the messages --------------------------------------------------
PY_SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
STAMP="$PREFIX/share/step_ros/setup_ros.stamp"
hash_inputs() {
  # content of every build input, plus where it is built from and into
  {
    printf '%s\n' "$ROOT" "$PREFIX" "$("$PY" -VV)"
    for f in "$ROOT"/msg/*.msg "$ROOT/CMakeLists.txt" "$ROOT/package.xml" "$REQS" "$ROOT/scripts/setup_ros.sh"; do
      printf '%s\n' "${f#"$ROOT"/}"
      cat "$f"
    done
  } | sha256sum | cut -d' ' -f1
}
HASH="$(hash_inputs)"

installed_ok() {
  [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$HASH" ] \
    && [ -f "$PY_SITE/step_ros/msg/__init__.py" ] && [ -f "$PY_SITE/step_ros/__init__.py" ]
}

if [ -z "${STEP_ROS_FORCE:-}" ] && installed_ok; then
  log "messages: up to date in $PY_SITE/step_ros (inputs unchanged since the last build)"
else
  # A build dir configured for another venv or checkout cannot be reused.
  if [ -f "$BUILD_DIR/CMakeCache.txt" ]; then
    cache_prefix="$(sed -n 's/^CMAKE_INSTALL_PREFIX:PATH=//p' "$BUILD_DIR/CMakeCache.txt")"
    cache_src="$(sed -n 's/^CMAKE_HOME_DIRECTORY:INTERNAL=//p' "$BUILD_DIR/CMakeCache.txt")"
    if [ "$cache_prefix" != "$PREFIX" ] || [ "$cache_src" != "$ROOT" ]; then
      log "build/msgs was configured for $cache_src -> $cache_prefix: starting it afresh"
      rm -rf "$BUILD_DIR"
    fi
  fi
  rm -f "$STAMP"
  t_build=$SECONDS

  mkdir -p "$LOGS"
  log "messages: configuring (build dir build/msgs)"
  cmake -S "$ROOT" -B "$BUILD_DIR" \
    -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_INSTALL_PREFIX="$PREFIX" \
    -DCMAKE_PREFIX_PATH="$PREFIX" \
    -DPython3_EXECUTABLE="$PY" \
    -DPython3_FIND_VIRTUALENV=ONLY \
    -DSTEP_ROS_MESSAGES_ONLY=ON \
    -DBUILD_TESTING=OFF \
    > "$LOGS/configure.log" 2>&1 \
    || { tail -n 60 "$LOGS/configure.log" >&2; die "cmake configure failed (full log: build/msgs-logs/configure.log)"; }
  log "messages: building"
  cmake --build "$BUILD_DIR" --parallel "$(nproc 2>/dev/null || echo 2)" \
    > "$LOGS/build.log" 2>&1 \
    || { tail -n 60 "$LOGS/build.log" >&2; die "build failed (full log: build/msgs-logs/build.log)"; }
  # Remove what the previous build installed (a removed or renamed message must not linger).
  if [ -f "$BUILD_DIR/install_manifest.txt" ]; then
    while IFS= read -r f; do
      case "$f" in "$PREFIX"/*) rm -f -- "$f" ;; esac
    done < "$BUILD_DIR/install_manifest.txt"
  fi
  log "messages: installing into $PREFIX"
  cmake --install "$BUILD_DIR" > "$LOGS/install.log" 2>&1 \
    || { tail -n 40 "$LOGS/install.log" >&2; die "cmake --install failed (full log: build/msgs-logs/install.log)"; }

  # Check from a neutral directory (not the checkout), in a fresh process with the
  # bootstrap of the wheels, exactly as users and the node will import the messages.
  ( cd / && env -u _ROS_WHEELS_BOOTSTRAP_COMPLETE "$PY" -c '
import step_ros
from step_ros.msg import HumanAction, TaskPrediction, LabelScore
from rclpy.serialization import serialize_message, deserialize_message
m = HumanAction(tasks=[TaskPrediction(task="t", top_k=[LabelScore(label="a", score=0.5)])])
assert deserialize_message(serialize_message(m), HumanAction) == m
' ) || die "the installed messages do not import / serialise (see the traceback above)"
  mkdir -p "$(dirname "$STAMP")"
  printf '%s\n' "$HASH" > "$STAMP"
  log "messages: built and installed into $PY_SITE/step_ros in $((SECONDS - t_build)) s"
fi

log "done in $((SECONDS - t_start)) s: from step_ros.msg import HumanAction, TaskPrediction, LabelScore"
