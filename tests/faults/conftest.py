"""The fault battery (tests/faults/): `faults_fast` runs in `make test`; `faults_full` only under
`make test-faults` (IOTPIPE_FAULTS_FULL=1), which runs both."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "faults_fast: the fault battery's fast part (make test)")
    config.addinivalue_line("markers", "faults_full: the whole fault battery (make test-faults)")
