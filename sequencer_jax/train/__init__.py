"""Training: mesh, state, steps, checkpoints and the loop."""
