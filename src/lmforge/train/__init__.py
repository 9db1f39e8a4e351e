"""Training: the loop (trainer.py), optimizers, schedules, checkpoints and logs."""
