"""Shared fixtures: tiny random models of the real classes and generated images, built once per session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from prep.testing import make_test_images, make_tiny_models

sys.path.insert(0, str(Path(__file__).parent))  # so tests can `import imagegen`


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """vae/, t5/, dinov3/, captioner/ saved with save_pretrained (about 4 s, once per session)."""
    return make_tiny_models(tmp_path_factory.mktemp("tiny_models"))


@pytest.fixture(scope="session")
def sample_images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The default generated image set: mixed sizes, aspects, formats and modes."""
    return make_test_images(tmp_path_factory.mktemp("sample_images"))
