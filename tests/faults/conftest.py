"""Fault-injection tests: real manager and daemon processes under crashes, cuts and db faults.

Helpers live in faultkit.py (this directory is on sys.path while these tests run).
Each test prints its figure; run with -s to see them:

    .venv/bin/python -m pytest tests/faults -s
"""
