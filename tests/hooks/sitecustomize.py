"""Hooks for test servers: on ``PYTHONPATH`` of the servers ``tests/helpers.start_server`` starts,
so they run in every process Python starts there (SGLang's scheduler included)."""

import er_test_faults
import er_test_fork

er_test_faults.install()
er_test_fork.install()
