"""Unit tests: no network beyond loopback helpers, no real registry."""

import pytest

# The shared contract suites live in the package: show their failed asserts in full.
pytest.register_assert_rewrite("registry_agent.testing.contract")
