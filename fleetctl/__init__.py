"""fleetctl, the operator's command line: one Typer app per noun over FleetService.

`app` holds the root command; `nodes`, `agents` (+ `fanout`), `metrics`,
`events` and `pki` one noun each; `client` dials the manager and explains
failures; `output` renders tables, JSON and YAML. See docs/fleetctl.md.
"""

import os

# grpc's C core logs failed handshakes to stderr when it initialises, i.e. on
# import; fleetctl explains them itself in one line. Set before grpc loads.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")
