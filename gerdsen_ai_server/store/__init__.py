"""Models on disk: the local scan, format detection, path confinement, hub pulls, the catalogue, the default model. No MLX, no Flask."""
