"""First-run set-up used by ``make run``: an admin account and a development node key.

Idempotent. The admin password is printed once, when the account is made. The
development node key is kept (mode 0600) in ``var/dev-node-key`` so later runs can
print the node URL again; it is an ordinary revocable key.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand

from nodes.auth import authenticate_key, node_key_create


class Command(BaseCommand):
    help = "Ensure an admin account and a development node key exist, and print how to use them."

    def add_arguments(self, parser):
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", default="8000")

    def handle(self, *args, host: str, port: str, **options):
        base = f"http://{host}:{port}"
        self.stdout.write("")
        self.stdout.write(self.style.MIGRATE_HEADING("ApexBridge hub"))
        self._ensure_admin(base)
        self._ensure_node_key(host, port)

    def _ensure_admin(self, base: str) -> None:
        users = get_user_model()
        if users.objects.filter(is_superuser=True, is_active=True).exists():
            self.stdout.write(f"  Admin:     {base}/admin/  (existing superuser; reset a password with")
            self.stdout.write("             .venv/bin/python manage.py changepassword <username>)")
            return
        username = os.environ.get("APEXBRIDGE_ADMIN_USER", "admin")
        password = os.environ.get("APEXBRIDGE_ADMIN_PASSWORD") or secrets.token_urlsafe(12)
        users.objects.create_superuser(username=username, email="", password=password)
        self.stdout.write(f"  Admin:     {base}/admin/")
        self.stdout.write(
            self.style.SUCCESS(f"             user {username!r}, password {password!r}  (shown once)")
        )

    def _ensure_node_key(self, host: str, port: str) -> None:
        key_file = Path(settings.BASE_DIR) / "var" / "dev-node-key"
        key = key_file.read_text().strip() if key_file.exists() else ""
        if not key or authenticate_key(key) is None:
            _row, key = node_key_create(name="development node key")
            key_file.parent.mkdir(parents=True, exist_ok=True)
            key_file.write_text(key + "\n")
            key_file.chmod(0o600)
            self.stdout.write("  Created a development node key (kept in var/dev-node-key).")
        url = f"ws://{host}:{port}/abp-distributed-server/VCP_Key={key}"
        self.stdout.write(f"  Dashboard: http://{host}:{port}/admin/dashboard/")
        self.stdout.write(f"  API docs:  http://{host}:{port}/api/docs/")
        self.stdout.write(f"  Node URL:  {url}")
        self.stdout.write("  Connect a demo worker node:")
        self.stdout.write(
            f"    .venv/bin/python manage.py runnode --hub ws://{host}:{port} --key {key} --name demo-worker"
        )
        self.stdout.write("")
