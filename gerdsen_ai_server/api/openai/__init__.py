"""OpenAI's API under /v1: one blueprint per endpoint family (chat, completions, embeddings,
responses, models), each registered in app.py.

Thin on purpose: validate with the schemas, hand the request to serving/ (which turns it into
``GenerationRequest``s for the engine) and serialize its answer as JSON or Server-Sent Events.
"""
