"""`python -m gerdsen_ai_server.cli` is the `impetus` command."""

from gerdsen_ai_server.cli.commands import main

if __name__ == "__main__":
    raise SystemExit(main())
