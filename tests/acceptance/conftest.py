"""Fixtures shared by the acceptance tests: the real pipeline (tests/acceptance/test_pipeline.py)
is set up the same way for every file that runs workers against it, and so is the CLI's seeded
deployment with one worker (tests/acceptance/test_cli_worker.py)."""

from tests.acceptance.test_cli_worker import deployment  # noqa: F401 - a fixture
from tests.acceptance.test_pipeline import make_pipeline  # noqa: F401 - a fixture
