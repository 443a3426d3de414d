"""lorafleet: federated and split LoRA fine-tuning of LLMs across heterogeneous devices."""

import os

# OpenMP threads that spin while waiting make torch many times slower when other processes
# compete for the cores (a 384x384 SVD took 5-9 s instead of 40 ms on a busy 2-core
# machine). Sleeping waits cost little otherwise. Must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
