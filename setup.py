"""megatron_patch: LLM families, data tools and conversion on an unmodified megatron-core."""
from setuptools import find_packages, setup

setup(
    name="megatron_patch",
    version="0.1.0",
    description="Continue pretraining, fine-tune and align HuggingFace LLMs on NVIDIA megatron-core",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_patch", "megatron_patch.*"]),
    install_requires=[
        # torch is not pinned here: the install scripts pin torch==2.13.0 only when torch is
        # absent, so a user's own CUDA build is never replaced.
        "torch>=2.4",
        "megatron-core>=0.16.1,<0.17",
        "transformers>=4.45",
        "safetensors",
        "tokenizers",
        "sentencepiece",
        # sentencepiece's model proto module: GLM-130B's tokenizer appends pieces to icetk's model
        "protobuf",
        "numpy",
        # megatron-core's checkpoint writer hangs forever without psutil.
        "psutil",
        "zstandard",
        "tqdm",
    ],
    extras_require={
        # The tests run megatron_patch.kernels in Triton's interpreter on the CPU.
        "test": ["pytest", "pytest-timeout", "pytest-xdist", "matplotlib", "triton>=3.0; platform_system == 'Linux'"],
        # Triton decode kernels (generate --decode-kernels); CUDA builds of torch bring it.
        "kernels": ["triton>=3.0"],
        "plot": ["matplotlib"],
        "tensorboard": ["tensorboard"],
    },
)
