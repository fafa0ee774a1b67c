"""tclab's test suite. A package, so that ``from tests.conftest import ...`` finds this folder even when an
installed distribution ships a top-level ``tests`` package of its own (torch-fidelity 0.4.0 does).
"""
