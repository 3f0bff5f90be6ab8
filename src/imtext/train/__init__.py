"""Training: the loop shared by both stages, schedules, checkpoints, distributed setup."""
