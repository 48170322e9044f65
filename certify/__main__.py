"""``python -m certify``: the ``certify`` command."""

from certify.cli import main

raise SystemExit(main())
