"""Process set-up before MLX loads: the BLAS library and the C allocator."""
