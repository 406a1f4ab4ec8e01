"""Shared fixtures: tiny Qwen3 checkpoints (built once per session) and the trained qwen3-micro."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from ggq import testing

ROOT = Path(__file__).resolve().parent.parent
# the embedded copy (models/, the demo's default) or the shared one beside the checkout
QWEN3_MICRO = next(
    (
        p
        for p in (ROOT / "models" / "qwen3-micro", ROOT.parent / "shared" / "models" / "qwen3-micro")
        if p.is_dir()
    ),
    ROOT / "models" / "qwen3-micro",
)
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``checkpoint("untied")`` -> directory of that fixture variant, built on first use."""
    built: dict[str, Path] = {}

    def get(variant: str) -> Path:
        if variant not in built:
            built[variant] = testing.build_checkpoint(tmp_path_factory.mktemp(variant), variant)
        return built[variant]

    return get


@pytest.fixture(scope="session")
def qwen3_micro() -> Path:
    if not (QWEN3_MICRO / "model.safetensors").is_file():
        pytest.skip(f"trained reference model not found at {QWEN3_MICRO}")
    return QWEN3_MICRO


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def prose(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real text for the fixtures: the first 12,000 bytes of the held-out book text (several
    128-token chunks for the fixtures' vocabulary)."""
    path = tmp_path_factory.mktemp("prose") / "prose.txt"
    path.write_bytes((shared_data / "gutenberg-heldout" / "heldout.txt").read_bytes()[:12_000])
    return path
