"""CPU-bound inference tasks, run by several worker processes."""
