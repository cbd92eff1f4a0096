"""``manage.py revoke_node_key <id | prefix | key>``: revoke a per-node key."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from nodes.auth import KEY_PREFIX, node_key_revoke
from nodes.models import NodeKey


class Command(BaseCommand):
    help = "Revoke a node key, found by its id, its prefix or the whole key."

    def add_arguments(self, parser) -> None:
        parser.add_argument("key", help="The key's id (as in the admin), its prefix, or the whole key.")

    def handle(self, *args, **options) -> None:
        wanted = options["key"].strip()
        key = None
        parts = wanted.split("_", 2)
        if len(parts) == 3 and parts[0] == KEY_PREFIX:
            key = NodeKey.objects.filter(prefix=parts[1]).first()  # a whole key: its prefix finds it
        if key is None:
            key = NodeKey.objects.filter(prefix=wanted).first()
        if key is None and wanted.isdigit():
            key = NodeKey.objects.filter(pk=int(wanted)).first()
        if key is None:
            raise CommandError(f"No node key with id or prefix {wanted[:24]!r}")
        if node_key_revoke(key=key):
            self.stdout.write(f"Revoked node key #{key.pk} {key.name!r} (prefix {key.prefix}).")
        else:
            self.stdout.write(f"Node key #{key.pk} {key.name!r} (prefix {key.prefix}) was already revoked.")
