"""Example agents built on the SDK, run with ``fleet-agent run <name>``.

- `probe`: checks TCP and HTTP(S) targets on an interval, reports latency and up.
- `worker`: checksums the files dropped in an inbox directory, in batches.
"""
