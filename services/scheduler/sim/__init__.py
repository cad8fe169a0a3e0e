"""TurboServe: sim."""
