from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """Path to `../shared/data` (read-only corpora, tokenizers, MNIST); skip when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"needs ../shared/data beside the checkout (looked in {SHARED_DATA})")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
