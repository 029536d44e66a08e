"""Shared fixtures; the cases themselves live in cases.py so tests can import them."""

import jax
import pytest
from cases import CELLS, I, T


@pytest.fixture(params=sorted(CELLS))
def cell_name(request):
    return request.param


@pytest.fixture
def cell(cell_name):
    return CELLS[cell_name]()


@pytest.fixture
def params(cell):
    return cell.init(jax.random.key(0), I)


@pytest.fixture
def xs():
    return jax.random.normal(jax.random.key(1), (T, I))
