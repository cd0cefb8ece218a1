"""drdo: kernel-optimized reference implementation of DRDO (Direct Reward Distillation
and policy-Optimization), with fused Triton log-prob and loss kernels."""
from setuptools import find_packages, setup

setup(
    name="drdo",
    version="0.1.0",
    description="DRDO preference alignment: plain PyTorch reference losses and fused Triton kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["drdo", "drdo.*", "drdo_kernels", "drdo_kernels.*"]),
    install_requires=[
        "torch>=2.4",
        'triton>=3.1; platform_system == "Linux"',
        "transformers>=4.46",
        "datasets>=2.20",
        "tokenizers>=0.19",
        "numpy",
        "tqdm",
        "pyyaml",
        "safetensors",
        "matplotlib",
    ],
    extras_require={
        "flash": ["flash-attn"],
        "trl": ["trl>=1.16"],
        "tensorboard": ["tensorboard"],
        "wandb": ["wandb"],
        "dev": ["pytest>=7", "pytest-timeout", "hypothesis>=6.100", "ruff", "trl>=1.16", "tensorboard"],
        "bench": ["liger-kernel", "cut-cross-entropy", "trl>=1.16", "matplotlib"],
    },
    entry_points={"console_scripts": ["drdo=drdo.cli:main"]},
    classifiers=["Programming Language :: Python :: 3", "License :: OSI Approved :: Apache Software License"],
)
