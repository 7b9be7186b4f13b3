"""``python -m adagrow``: the same CLI as the ``adagrow`` command."""
from adagrow.cli import main

raise SystemExit(main())
