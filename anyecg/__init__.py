"""anyECG-chat's published model run here: its preprocessing, ECG ViT, projector and chat entry (release.py), and LoRA
adapters in peft's format, which its release ships and a train.py --llm run writes (peft.py)."""
