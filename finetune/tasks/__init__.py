"""Fine-tuning tasks: one file per task."""
