"""mgrpo_jax: Multi-GRPO (tree rollouts, multi-reward advantages) for flow-matching T2I models in JAX."""

import setuptools

setuptools.setup(
    name="mgrpo_jax",
    version="0.1.0",
    description="Multi-GRPO RL fine-tuning of flow-matching text-to-image models in JAX/Flax NNX.",
    packages=setuptools.find_packages(include=["mgrpo_jax", "mgrpo_jax.*"]),
    # The pretrained tiny text renderer and its synthetic OCR-Color prompt files.
    package_data={"mgrpo_jax": ["assets/tiny_text_renderer/*", "assets/synthetic_ocr_color/*"]},
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.7",
        "flax>=0.12",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "ml-collections>=1.0",
        "grain>=0.2.10",
        "safetensors>=0.4",
        "transformers>=4.45",
        "numpy>=1.26",
        "Pillow>=10",
        "absl-py>=2",
        "rapidocr-onnxruntime>=1.4",
        "tensorboardX>=2.6",
        "matplotlib>=3.8",
        "tqdm>=4.66",
    ],
    extras_require={
        "test": ["pytest>=8", "chex>=0.1.88", "nbclient>=0.10", "nbformat>=5.10", "ipykernel>=6.29"],
        # PyTorch oracles for the parity tests (CPU build; constraints.txt pins torch==2.13.0).
        "parity": ["torch", "diffusers>=0.35", "peft>=0.17"],
        # Accelerator builds of jax; install with `pip install -e ".[tpu]"` on a TPU VM.
        "tpu": ["jax[tpu]"],
        "cuda": ["jax[cuda12]"],
        # Optional Weights & Biases logging (config.log.wandb_project).
        "wandb": ["wandb>=0.17"],
        # Optional TFDS builders of the prompt sets (mgrpo_jax/data/tfds_builders.py); no
        # TensorFlow needed.
        "tfds": ["tensorflow-datasets>=4.9.4", "importlib_resources"],
    },
    entry_points={
        "console_scripts": [
            "mgrpo-train=mgrpo_jax.train:run",
            "mgrpo-sample=mgrpo_jax.sample:run",
            "mgrpo-eval=mgrpo_jax.evaluate:run",
            "mgrpo-export=mgrpo_jax.export:run",
        ]
    },
)
