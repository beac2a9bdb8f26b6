"""Shared fixtures: each concern lives in its own module under tests/fixtures/."""

pytest_plugins = [
    "tests.fixtures.services",
    "tests.fixtures.models",
    "tests.fixtures.data",
    "tests.fixtures.ray",
]
