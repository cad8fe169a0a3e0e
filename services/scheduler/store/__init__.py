"""TurboServe: store."""
