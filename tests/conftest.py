import os

import numpy as np
import pytest
from hypothesis import settings

# Few, fixed-seed examples in CI: every example compiles a kernel (~0.3 s) or a model (~2 s).
settings.register_profile("ci", max_examples=int(os.environ.get("SPARKS_EXAMPLES", "12")), deadline=None,
                          derandomize=True, print_blob=True)
settings.load_profile("ci")


@pytest.fixture(scope="session")
def host():
    from sparks_tvm.target import host_target

    return host_target()


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
