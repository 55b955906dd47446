"""``python -m lrpc``: the ``lrpc`` command line, also where the installed script is not on the PATH."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
