"""The run layer: what training writes and every later command reads, below train/eval/data.

checkpoints (orbax, with the data iterator's state), workdir (config.json, its hash, library
versions), progress (the console progress line), multihost (process start-up and modes), gc_policy
(the garbage collector's settings for processes that trace JAX programs), malloc_policy
(glibc's malloc settings for XLA:CPU's host buffers: huge pages by default, reuse opt-in).
"""
