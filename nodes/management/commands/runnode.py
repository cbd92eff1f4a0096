"""``python manage.py runnode``: run this machine as a node of a hub, serving the demo
tools. Same options as ``python -m nodes.client`` (PROTOCOL §8); the logic lives there."""

from __future__ import annotations

import sys

from django.core.management.base import BaseCommand

from nodes.client.cli import add_arguments, run_node


class Command(BaseCommand):
    help = "Connect to a hub as a node and serve the demo tools (echo, sleep, sha256)."
    # A node needs none of the hub's own checks (database, settings for serving).
    requires_system_checks: list[str] = []

    def add_arguments(self, parser):
        add_arguments(parser)

    def handle(self, *args, **options):
        exit_code = run_node(options)
        if exit_code:
            sys.exit(exit_code)
