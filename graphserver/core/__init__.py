"""Torch-free serving core: requests, the KV block allocator and the scheduler.

Nothing here knows about tensors or devices, so every policy (admission, token budget, chunked
prefill, preemption, abort) is unit-tested on the CPU without a model.
"""
