"""Unit tests of the worker role (training path, data, memory estimator, tiny model)."""
