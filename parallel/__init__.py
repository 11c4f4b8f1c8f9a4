"""Past one process: FSDP2 sharding and its checkpoint files (fsdp.py), for train.py --parallel fsdp. DDP needs nothing
beyond PyTorch's own wrapper, in train.py."""
