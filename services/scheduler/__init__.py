"""The scheduler: one decider (control_loop, running the pure policy in policy/ on a snapshot of PostgreSQL), the
session lifecycle and worker liveness it decides on, the only NATS code (runner), durable state (store,
migrations); the simulator in sim/ runs the same policy."""
