"""fleetctl, the operator's command line: one Typer app per noun over FleetService.

`app` holds the root command; `nodes`, `agents` (+ `fanout`), `metrics`,
`events` and `pki` one noun each; `client` dials the manager and explains
failures; `output` renders tables, JSON and YAML. See docs/fleetctl.md.
"""
