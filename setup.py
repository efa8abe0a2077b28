from setuptools import Extension, find_packages, setup

setup(
    name="megatron-apriel",
    version="0.1.0",
    description="The Apriel training recipe (depth upscaling, CPT, SFT, GRPO, merging) on megatron-core",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_apriel", "megatron_apriel.*"]),
    include_package_data=True,
    package_data={"megatron_apriel.data": ["templates/*.jinja"]},  # the released chat templates
    # The compiled Tekken fast path of tools/preprocess_data.py; optional: without a C compiler the
    # install still succeeds and the tokenizer uses tiktoken alone (same ids, slower).
    ext_modules=[Extension("megatron_apriel.data._tekken_fast", ["megatron_apriel/data/_tekken_fast.c"],
                           extra_compile_args=["-O3"], optional=True)],
    install_requires=[
        # The CPU wheel of torch is installed first by .ci/run; this range never asks for a newer one.
        "torch>=2.6",
        # 0.16.x is the newest release for Python 3.11 (0.17 needs Python 3.12); tested on 0.16.1.
        "megatron-core>=0.16.1,<0.17",
        "numpy",
        "transformers>=5.24,<6",  # apply_chat_template(sanitize_control_tokens=True): message text stays text
        "safetensors",
        "tokenizers",
        "sentencepiece",
        "mistral-common>=1.5",
        "tiktoken",
        "huggingface-hub",
        "pyyaml",
        "tqdm",
        "psutil",
        "zstandard",
        "pyarrow",
        "tensorboard",
        "matplotlib",
        "pillow",
        "sympy",
        "jsonschema",
        # model.fp8: torchao-tensorwise | torchao-rowwise (float8 GEMMs in the local layer spec;
        # emulated on the CPU backend, which the tests use); tested on 0.18.0
        "torchao>=0.18,<0.19",
    ],
    extras_require={
        "gpu": ["transformer-engine[pytorch]"],
        "wandb": ["wandb"],
        "rl": ["trl>=0.20", "accelerate", "datasets"],
        # apriel eval / merge-search: lm-evaluation-harness is the engine (tested on 0.4.13)
        "eval": ["lm-eval>=0.4.13,<0.5", "datasets"],
        # ruff and import-linter: .ci/run checks the code style and the layering before the tests
        "dev": ["pytest", "pytest-timeout", "pytest-xdist>=3.8,<4",
                "trl>=0.20", "accelerate", "datasets", "wandb", "lm-eval>=0.4.13,<0.5",
                "ruff>=0.17,<0.18", "import-linter>=2.16,<3"],
    },
    entry_points={"console_scripts": ["apriel=megatron_apriel.cli:main"]},
)
