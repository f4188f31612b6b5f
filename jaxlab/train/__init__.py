"""Training engine: sharding, steps, loop, checkpoints."""
