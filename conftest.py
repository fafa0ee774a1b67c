"""Test-session setup for the whole repository (tests/ and the notebooks nbval executes).

Notebooks executed by the suite open run folders like any interactive run; point them at a
temporary reports folder so running the tests never adds runs to the project's reports/ (where
they would show in index.html and be read by the in-house report's "auto" recommendation).
"""

import os
import tempfile


def pytest_configure(config):
    from tclab.runs import REPORTS_DIR_ENV

    if not os.environ.get(REPORTS_DIR_ENV):
        os.environ[REPORTS_DIR_ENV] = tempfile.mkdtemp(prefix="tclab-test-reports-")
