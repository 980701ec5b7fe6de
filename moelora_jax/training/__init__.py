"""The fine-tuning job: settings, the trainer's step, the loop, checkpoints, preemption and run records."""
