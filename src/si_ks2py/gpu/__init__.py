"""CuPy ops: CUDA kernels (the .cu files beside this module) compiled with cupy.RawModule."""
