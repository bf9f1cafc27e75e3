"""Training: train state and optimizer (state.py), device mesh and the parameter sharding rule
(sharding.py), the sharded jitted train step (step.py), pretrained initialisation of a fresh
run (init_from.py), preemption, TensorBoard logging and the training loop (trainer.py).
Checkpoints and the workdir's files are the run layer's (dfrec_jax/run)."""
