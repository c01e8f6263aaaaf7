"""The daemon's supervisor: agent specs, the lifecycle table, processes, logs, state files."""
