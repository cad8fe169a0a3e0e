"""The scheduler: decisions (placement, coordinator), the only NATS code (runner), durable state (store,
migrations); the closed-loop policy and its simulator live in policy/ and sim/."""
