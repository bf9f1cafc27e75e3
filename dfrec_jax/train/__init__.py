"""Training: train state and optimizer (state.py), device mesh and the parameter sharding rule
(sharding.py), the sharded jitted train step (step.py), checkpoints and the training loop."""
