"""`lorakit demo`: the study notes' experiment (rank-1 LoRA on the worst digit) run for real, with its report."""
