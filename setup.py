"""pip install of the step_ros Python package (the ROS 2 build uses CMakeLists.txt + package.xml)."""

from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="step_ros",
    version="0.1.0",
    description="Order-aware human action perception for ROS 2: STEP heads on a frozen DINOv2",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["step_ros", "step_ros.*"]),
    # the datasets' nearly symmetric pairs and the papers' published figures (step-ros import / benchmark)
    package_data={"step_ros.data.importers": ["pairs/*.yaml", "papers/*.yaml"]},
    # the message definitions, so rosbags can decode step_ros messages without the source tree
    data_files=[("share/step_ros/msg", sorted(str(p) for p in Path("msg").glob("*.msg")))],
    install_requires=[
        "torch>=2.3",  # JetPack 6.0's NVIDIA wheel is 2.3.0; step_ros.support checks the rest at start-up
        "transformers>=4.47",  # transformers 5 needs torch >= 2.6: use 4.x with an older torch
        "safetensors>=0.4",
        "numpy>=1.24",
        "PyYAML>=6",
        "av>=12",
        "opencv-python-headless>=4.8",
        "matplotlib>=3.7",
        "tqdm>=4.60",
        "rich>=13",
        "rosbags>=0.10",
        "packaging>=21",
        "psutil>=5.9",  # bench --suite data: memory of the process tree
        "scipy>=1.9",  # diff-eval over training runs: Student t quantiles
    ],
    extras_require={
        "onnx": ["onnx>=1.15", "onnxruntime>=1.17"],
        # On Jetson use the TensorRT Python bindings that JetPack ships instead.
        "tensorrt": ["tensorrt>=10,<11"],  # x86 wheels; JetPack 6.0's bindings (8.6) also work
        # < 8.4: launch_testing's pytest plugin (loaded by every sourced ROS install) breaks pytest
        # 8.4+ on Humble (ros2/launch#979); Ubuntu's python3-pytest is 6.2 (22.04) / 7.4 (24.04).
        "test": ["pytest>=6.2,<8.4"],
    },
    entry_points={"console_scripts": ["step-ros = step_ros.cli:main"]},
)
