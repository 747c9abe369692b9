"""Backends behind one contract (base.py): MLX and llama.cpp."""
