"""The manager's use cases: decisions between the servicers and storage."""
