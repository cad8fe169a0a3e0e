"""TurboServe: policy."""
