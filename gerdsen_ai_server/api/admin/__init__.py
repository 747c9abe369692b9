"""The operator's routes under /api/: models, pulls, config, hardware, running requests.

Every change under /api/ and the reads /api/config and /api/requests need an admin key when keys are
configured (web/keys.py decides by path, before routing).
"""
