"""pie's runtime: KV page allocation (pages), continuous batching (scheduler, batching, passes),
the engine that runs inferlets (engine) and how the SDK finds it (scope)."""
