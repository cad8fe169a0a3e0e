"""TurboServe: services."""
