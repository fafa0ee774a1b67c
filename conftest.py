"""Test-session setup for the whole repository (tests/ and the notebooks nbval executes).

Notebooks executed by the suite open run folders like any interactive run; point them at a
temporary reports folder so running the tests never adds runs to the project's reports/ (where
they would show in index.html and be read by the in-house report's "auto" recommendation), and
the artefact store ($TCLAB_HOME) at a temporary folder, so nothing lands in the user's cache.
"""

import os
import tempfile


def pytest_configure(config):
    from tclab.artefacts import HOME_ENV
    from tclab.runs import REPORTS_DIR_ENV

    if not os.environ.get(REPORTS_DIR_ENV):
        os.environ[REPORTS_DIR_ENV] = tempfile.mkdtemp(prefix="tclab-test-reports-")
    # predictors and classifiers trained by tests go to a temporary artefact store, never the user's
    os.environ[HOME_ENV] = tempfile.mkdtemp(prefix="tclab-test-home-")
