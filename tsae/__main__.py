"""``python -m tsae`` = the ``tsae`` command (``cli.py``)."""

from cli import main

if __name__ == "__main__":
    main(prog_name="tsae")
