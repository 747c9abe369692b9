# Gunicorn reads ./gunicorn.conf.py by default. The real configuration, with the reasons for
# each choice, lives in the package so that the installed `impetus serve` finds it too.
from gerdsen_ai_server.cli.gunicorn_conf import *  # noqa: F401,F403
