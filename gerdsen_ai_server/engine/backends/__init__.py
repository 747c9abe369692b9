"""Engines other than MLX behind the same ``submit(request) -> TokenStream`` interface."""
