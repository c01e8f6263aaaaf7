"""fleetctl ui: the web console, served on this machine over the operator's connection.

`app` is the local web server (security checks, the console's files, the
FleetService routes); `command` is the CLI command; `static/` holds the
console itself (docs/console.md).
"""
