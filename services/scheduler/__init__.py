"""TurboServe: scheduler."""
