"""TurboServe: state."""
