"""The device side: the KV arena, the static I/O of the batched step, the model runner, graphs."""
