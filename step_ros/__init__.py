"""step_ros: order-aware human action perception (STEP heads on a frozen DINOv2).

The Python package shares its name with the ROS 2 package, whose rosidl-generated
messages install as ``step_ros.msg`` into site-packages.  Extending ``__path__``
lets ``from step_ros.msg import HumanAction`` resolve both when this source tree
is installed in editable mode and when colcon installs everything into one folder.
"""

from pkgutil import extend_path

__path__ = extend_path(__path__, __name__)  # noqa: F821 (module attribute)

__version__ = "0.1.0"
