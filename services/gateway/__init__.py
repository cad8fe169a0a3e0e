"""TurboServe: gateway."""
