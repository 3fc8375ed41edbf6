"""Launch the step_ros ``human_action`` node on a camera.

    ros2 launch step_ros hri.launch.py image:=/camera/color/image_raw
    ros2 launch step_ros hri.launch.py image:=/cam/image_raw manifest:=/models/cell/manifest.yaml \\
        backend:=tensorrt device:=cuda namespace:=robot1
    ros2 launch step_ros hri.launch.py params_file:=/my/params.yaml use_sim_time:=true   # bag + /clock

Every node parameter is in ``params_file`` (default: the installed ``config/hri_params.yaml``);
``manifest``, ``weights``, ``backend`` and ``device`` override it only when given (non-empty).
Topics: subscribes ``<image>`` (``sensor_msgs/Image``; ``<image>/compressed`` with
``input: compressed`` in the parameters), publishes ``human_action`` (in ``namespace``) and
``/diagnostics``.
"""

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.substitutions import FindPackageShare

#: launch arguments that override the parameters file when they are not empty
OVERRIDES = ("manifest", "weights", "backend", "device")


def _is_true(text: str) -> bool:
    return text.strip().lower() in ("true", "1", "yes", "on")


def _human_action_node(context, *args, **kwargs):
    """Build the Node once the arguments are known (empty arguments must not override the file)."""
    def arg(name: str) -> str:
        return LaunchConfiguration(name).perform(context).strip()

    overrides = {name: arg(name) for name in OVERRIDES if arg(name)}
    overrides["use_sim_time"] = _is_true(arg("use_sim_time"))
    image = arg("image").rstrip("/") or "/camera/image_raw"
    return [
        Node(
            package="step_ros",
            executable="step_ros_node",
            name="human_action",
            namespace=arg("namespace"),
            parameters=[arg("params_file"), overrides],
            remappings=[("image", image), ("image/compressed", image + "/compressed")],
            output="screen",
            emulate_tty=True,
        )
    ]


def generate_launch_description() -> LaunchDescription:
    return LaunchDescription([
        DeclareLaunchArgument(
            "image", default_value="/camera/image_raw",
            description="camera image topic (sensor_msgs/Image); with input: compressed the node "
                        "subscribes <image>/compressed"),
        DeclareLaunchArgument(
            "manifest", default_value="",
            description="model manifest YAML; empty = the parameters file's (the demo model by default)"),
        DeclareLaunchArgument(
            "weights", default_value="",
            description="backbone weights overriding the manifest's backbone.weights; empty = the manifest's"),
        DeclareLaunchArgument(
            "backend", default_value="",
            description="torch | onnxruntime | onnxruntime-int8 | tensorrt; empty = the parameters file's"),
        DeclareLaunchArgument(
            "device", default_value="",
            description="auto | cpu | cuda | cuda:N; empty = the parameters file's"),
        DeclareLaunchArgument(
            "namespace", default_value="",
            description="namespace of the node (and of its human_action topic)"),
        DeclareLaunchArgument(
            "params_file",
            default_value=PathJoinSubstitution([FindPackageShare("step_ros"), "config", "hri_params.yaml"]),
            description="node parameters YAML"),
        DeclareLaunchArgument(
            "use_sim_time", default_value="false",
            description="use /clock (e.g. a bag played with --clock) for the latency figures"),
        OpaqueFunction(function=_human_action_node),
    ])
