"""launch/hri.launch.py and config/hri_params.yaml.

Here (ROS 2 from Python wheels) ``launch``, ``launch_ros`` and ``launch_testing`` cannot be
installed (SPEC section 4): the launch file is checked statically (it compiles; it declares the
documented arguments; it starts ``step_ros_node`` as ``human_action`` with the parameters file
and the overrides) and the parameters file against the node's parameter table. On a robot with
ROS 2 from apt and the package built with colcon, ``test_launch_file_with_launch_testing``
runs the launch file for real under ``launch_testing`` (a generated launch test, run by pytest
in a subprocess: a module holding ``generate_test_description`` is taken over whole by the
launch_testing pytest plugin, which would hide the static tests of this file).
"""

from __future__ import annotations

import ast
import json
import os
import py_compile
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, tiny_manifest_dict

LAUNCH_FILE = ROOT / "launch" / "hri.launch.py"
PARAMS_FILE = ROOT / "config" / "hri_params.yaml"
NODE_FILE = ROOT / "step_ros" / "ros" / "node.py"
EXPECTED_ARGUMENTS = {"image", "manifest", "weights", "backend", "device", "namespace", "params_file", "use_sim_time"}


def _calls(tree: ast.AST, name: str) -> list[ast.Call]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            fname = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
            if fname == name:
                out.append(node)
    return out


def _node_parameters() -> dict[str, object]:
    """The node's parameter table (``_PARAMETERS`` in node.py), read without importing rclpy."""
    tree = ast.parse(NODE_FILE.read_text())
    for node in tree.body:
        target = getattr(node, "target", None) or (node.targets[0] if isinstance(node, ast.Assign) else None)
        if isinstance(target, ast.Name) and target.id == "_PARAMETERS":
            return {name: default for name, default, _text, _extra in ast.literal_eval(node.value)}
    raise AssertionError("node.py has no _PARAMETERS table")


def test_launch_file_compiles(tmp_path):
    py_compile.compile(str(LAUNCH_FILE), cfile=str(tmp_path / "hri.launch.pyc"), doraise=True)


def test_launch_file_declares_the_arguments_and_the_node():
    tree = ast.parse(LAUNCH_FILE.read_text(), filename=str(LAUNCH_FILE))
    assert any(isinstance(n, ast.FunctionDef) and n.name == "generate_launch_description" for n in tree.body)
    declared = {}
    for call in _calls(tree, "DeclareLaunchArgument"):
        name = call.args[0].value if call.args else next(k.value.value for k in call.keywords if k.arg == "name")
        kws = {k.arg: k.value for k in call.keywords}
        assert "description" in kws and "default_value" in kws, f"argument {name}: description and default"
        declared[name] = kws["default_value"]
    assert set(declared) == EXPECTED_ARGUMENTS
    assert ast.literal_eval(declared["image"]) == "/camera/image_raw"
    assert ast.literal_eval(declared["use_sim_time"]) == "false"
    for name in ("manifest", "weights", "backend", "device", "namespace"):
        assert ast.literal_eval(declared[name]) == "", f"{name} must default to empty (no override)"
    params_default = ast.unparse(declared["params_file"])
    assert "FindPackageShare('step_ros')" in params_default and "hri_params.yaml" in params_default
    assert "PathJoinSubstitution" in params_default

    nodes = _calls(tree, "Node")
    assert len(nodes) == 1
    kws = {k.arg: k.value for k in nodes[0].keywords}
    assert ast.literal_eval(kws["package"]) == "step_ros"
    assert ast.literal_eval(kws["executable"]) == "step_ros_node"
    assert ast.literal_eval(kws["name"]) == "human_action"
    assert ast.literal_eval(kws["output"]) == "screen" and ast.literal_eval(kws["emulate_tty"]) is True
    for key in ("namespace", "parameters", "remappings"):
        assert key in kws
    remaps = ast.unparse(kws["remappings"])
    assert "('image', image)" in remaps and "('image/compressed', image + '/compressed')" in remaps
    imports = {(n.module, a.name) for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    assert {("launch_ros.actions", "Node"), ("launch_ros.substitutions", "FindPackageShare"),
            ("launch.actions", "DeclareLaunchArgument")} <= imports


def test_params_file_sets_every_node_parameter_with_a_comment():
    data = yaml.safe_load(PARAMS_FILE.read_text())
    params = data["/**"]["ros__parameters"]
    table = _node_parameters()
    assert set(params) == set(table), f"missing: {set(table) - set(params)}, unknown: {set(params) - set(table)}"
    for name, default in table.items():
        assert type(params[name]) is type(default), f"{name}: {params[name]!r} vs the node's {default!r}"
        if name not in ("manifest", "weights"):
            assert params[name] == default, f"{name}: the file should document the node's default"
    lines = PARAMS_FILE.read_text().splitlines()
    for i, line in enumerate(lines):
        key = line.strip().split(":")[0]
        if key in table:
            assert lines[i - 1].strip().startswith("#") or "#" in line, f"{key} has no comment"


# --------------------------------------------------------------------------- launch_testing (robots)

LAUNCH_TEST = '''
import time
import unittest

import launch
import launch_testing
import launch_testing.actions
import launch_testing.asserts
import numpy as np
import pytest
import rclpy
from launch.actions import IncludeLaunchDescription
from launch.launch_description_sources import PythonLaunchDescriptionSource
from sensor_msgs.msg import Image
from step_ros.msg import HumanAction


@pytest.mark.launch_test
def generate_test_description():
    return launch.LaunchDescription([
        IncludeLaunchDescription(
            PythonLaunchDescriptionSource({launch_file!r}),
            launch_arguments={{"image": "/lt/camera", "manifest": {manifest!r}, "backend": "torch",
                               "device": "cpu", "namespace": "lt", "params_file": {params!r}}}.items(),
        ),
        launch_testing.actions.ReadyToTest(),
    ])


class TestHumanAction(unittest.TestCase):
    def test_publishes_human_action(self):
        rclpy.init()
        node = rclpy.create_node("hri_launch_test")
        got = []
        node.create_subscription(HumanAction, "/lt/human_action", got.append, 10)
        pub = node.create_publisher(Image, "/lt/camera", 10)
        try:
            deadline = time.monotonic() + 120
            while pub.get_subscription_count() < 1 and time.monotonic() < deadline:
                rclpy.spin_once(node, timeout_sec=0.1)
            rng = np.random.default_rng(0)
            i = 0
            while not got and time.monotonic() < deadline:
                msg = Image(height=48, width=48, encoding="rgb8", step=144,
                            data=rng.integers(0, 256, 48 * 144, dtype=np.uint8).tobytes())
                msg.header.stamp = node.get_clock().now().to_msg()
                pub.publish(msg)
                i += 1
                end = time.monotonic() + 0.05
                while time.monotonic() < end:
                    rclpy.spin_once(node, timeout_sec=0.01)
            self.assertTrue(got, "no HumanAction on /lt/human_action")
            self.assertEqual([t.task for t in got[0].tasks], {tasks!r})
        finally:
            node.destroy_node()
            rclpy.shutdown()


@launch_testing.post_shutdown_test()
class TestShutdown(unittest.TestCase):
    def test_exit_code_zero(self, proc_info):
        launch_testing.asserts.assertExitCodes(proc_info)
'''


def _write_tiny_model(folder: Path) -> tuple[Path, list[str]]:
    import torch

    from step_ros.model.manifest import parse_manifest
    from step_ros.model.multitask import build_head, save_head

    data = tiny_manifest_dict()
    manifest = parse_manifest(data, folder)
    torch.manual_seed(0)
    tokens = (data["backbone"]["image_size"] // 14) ** 2
    for spec, raw in zip(manifest.heads, data["heads"]):
        head = build_head(spec, 64, manifest.frames, tokens)
        save_head(head, spec, folder / f"{spec.task}.safetensors", dim=64, frames=manifest.frames, num_tokens=tokens)
        raw["checkpoint"] = f"{spec.task}.safetensors"
    path = folder / "manifest.yaml"
    path.write_text(json.dumps(data))
    return path, manifest.tasks


def test_launch_file_with_launch_testing(tmp_path):
    pytest.importorskip("launch_testing", reason="launch_testing is not installable here (ROS 2 from wheels, "
                        "SPEC section 4); this test runs on a robot with ROS 2 from apt after colcon build")
    pytest.importorskip("launch_ros", reason="launch_ros is not installed")
    from ament_index_python.packages import PackageNotFoundError, get_package_prefix

    try:
        prefix = Path(get_package_prefix("step_ros"))
    except PackageNotFoundError:
        pytest.skip("step_ros is not installed in an ament prefix: colcon build --packages-select step_ros")
    if not (prefix / "lib" / "step_ros" / "step_ros_node").is_file():
        pytest.skip(f"{prefix}/lib/step_ros/step_ros_node missing: colcon build --packages-select step_ros")
    manifest, tasks = _write_tiny_model(tmp_path / "model")
    test_file = tmp_path / "hri_launch_test.py"
    test_file.write_text(textwrap.dedent(LAUNCH_TEST).format(
        launch_file=str(LAUNCH_FILE), manifest=str(manifest), params=str(PARAMS_FILE), tasks=tasks))
    env = dict(os.environ, ROS_DOMAIN_ID=str(150 + os.getpid() % 50), ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test_file)],
                         cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
