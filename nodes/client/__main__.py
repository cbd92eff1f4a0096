"""``python -m nodes.client``: run a node with the demo tools."""

from .cli import main

raise SystemExit(main())
