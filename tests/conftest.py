"""The suite's root fixtures (each folder's conftest.py adds its own; helper functions are in tests/helpers/):

* ``_threads`` (autouse): one torch thread per test process;
* ``compose``: the resolved config of ``python -m kdlab <overrides>`` (tests.helpers.config.compose_config);
* ``synthetic_dm``: a small in-memory synthetic datamodule (tests.helpers.data.synthetic_datamodule).
"""
from __future__ import annotations

import pytest
import torch

from tests.helpers.config import compose_config
from tests.helpers.data import synthetic_datamodule


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="session")
def compose():
    """``compose("+experiment=kd_fashion_mnist", "seed=1")``: :func:`compose_config` as a fixture."""
    return compose_config


@pytest.fixture(scope="session")
def synthetic_dm():
    """``synthetic_dm(n_train=256, n_test=64, batch_size=32)``: :func:`synthetic_datamodule` as a fixture."""
    return synthetic_datamodule
