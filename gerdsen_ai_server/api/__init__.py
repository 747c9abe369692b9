"""Routes only: one Flask blueprint per file, registered explicitly in app.py."""
