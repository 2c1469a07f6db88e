"""The CPU serving path's own kernels: C sources compiled on first use (native.py) and loaded through
ctypes, with the Python that calls them; and the allocator setting that keeps a step's memory."""
