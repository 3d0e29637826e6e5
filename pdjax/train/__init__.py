"""Training: the hybrid AR + diffusion loss, the sharded train step, the trainer and `python -m pdjax.train`."""
