"""Fixtures shared by the acceptance tests: the real pipeline (tests/acceptance/test_pipeline.py)
is set up the same way for every file that runs workers against it."""

from tests.acceptance.test_pipeline import make_pipeline  # noqa: F401 - a fixture
