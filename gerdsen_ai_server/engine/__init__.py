"""The engine: one OS thread owns every MLX call; model loading, batching, sampling. Never imports Flask."""
