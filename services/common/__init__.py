"""TurboServe: common."""
