"""What every part of kdray stands on: errors, registries and their parameters, storage, progress
meters, metrics, safe YAML, the user's-code boundary and leases. It imports nothing else of kdray."""
