"""``python -m attnlab`` runs the command-line tool."""

from attnlab.cli import main

raise SystemExit(main())
