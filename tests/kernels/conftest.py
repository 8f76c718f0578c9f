"""Shared by the kernel tests: a random generator seeded from each test's name."""

import pytest
from helpers.kernels import seeded_rng


@pytest.fixture
def rng(request):
    return seeded_rng(request)
