from django.apps import AppConfig


class LLMProxyConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "llmproxy"
