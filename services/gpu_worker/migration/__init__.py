"""TurboServe: migration."""
