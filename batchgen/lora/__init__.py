"""Multi-LoRA: PEFT adapters served side by side in one batch.

- adapters.py (torch): reads and validates PEFT directories into CPU tensors.
- slots.py (pure Python, used by the scheduler): which adapter sits in which of the max_loras
  device slots, pins held by running requests, LRU eviction of idle adapters.
- layers.py (torch): the stacked slot tensors, loading adapters into slots, and the per-token
  delta `y += scale * (x @ A[slot]^T) @ B[slot]^T` over a mixed batch (torch on CPU, Triton SGMV on CUDA).

This package's __init__ imports nothing, so that `batchgen.lora.slots` stays torch-free for sched/.
"""
