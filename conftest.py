"""Repository-root conftest: its only job is to put the repository root on sys.path.

pytest (prepend import mode) inserts the directory of every conftest.py it
loads into sys.path; this file makes that the repository root, so tests can
import the simulated daemons of the benchmarks as `bench.sim`, whatever
directory pytest was started from. Fixtures live in tests/conftest.py.
"""
