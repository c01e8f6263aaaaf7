"""The manager's JSON/HTTP API: FleetService over HTTPS (docs/http-api.md).

`app` generates the routes from the service descriptor and runs the gRPC
servicer itself; `context` is what the servicer sees of an HTTP call;
`server` is the HTTPS listener.
"""
