"""Pydantic wire models, one module per API or resource they describe."""
