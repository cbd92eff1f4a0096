from django.apps import AppConfig


class NodesConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "nodes"

    def ready(self) -> None:
        import nodes.node_rows  # noqa: F401 - drops the dispatch pass's kept rows when a node is saved
        from nodes.auth import hide_keys_in_server_logs

        hide_keys_in_server_logs()
