"""NumPy twins of the GPU ops: the reference for parity tests and the CPU path."""
