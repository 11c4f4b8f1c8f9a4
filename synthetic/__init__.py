"""What the default run trains on, made here with exact ground truth: the ECG generator (generator.py), the task rows
built from it (tasks.py), the answering steps as text (skills.py), the encoder warm-up on its truth (warmup.py),
pictures of it (draw.py), and its ECGs as ECG-Bench-style rows (ecgbench.py)."""
