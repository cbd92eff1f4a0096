"""The node's small state file: keeps its node id stable across restarts."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

logger = logging.getLogger("apexbridge.node")

STATE_DIR = Path("~/.apexbridge")


def default_state_file(name: str) -> Path:
    """One file per node name, so several nodes on one machine keep their own ids."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "node"
    return (STATE_DIR / f"node-{slug}.json").expanduser()


def load_node_id(path: Path) -> str | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        logger.warning("Ignoring unreadable state file %s (%s)", path, exc)
        return None
    node_id = data.get("nodeId") if isinstance(data, dict) else None
    return node_id if isinstance(node_id, str) and node_id else None


def save_node_id(path: Path, node_id: str) -> None:
    """Write atomically (temp file + rename) so a crash never leaves half a file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.with_name(path.name + ".tmp")
        temp.write_text(json.dumps({"nodeId": node_id}) + "\n", encoding="utf-8")
        os.replace(temp, path)
    except OSError as exc:
        logger.warning("Could not save node id to %s (%s); it may change on restart", path, exc)
