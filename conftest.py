"""Root conftest: loads the harness's pytest plugin for both the conformance suite and tests/."""

pytest_plugins = ["conformance.plugin"]
