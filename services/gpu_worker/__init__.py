"""TurboServe: gpu_worker."""
