"""TurboServe: state_store."""
