"""DRF token authentication with its lookup prepared once (``apexbridge.db.prepared``).

Every API request by token reads its token and user: with the query built by the ORM
each time, that read was the largest single cost of ``POST /api/tasks`` under load.
The answers are DRF's own (same errors, same checks), and nothing is cached: a
deleted token or a deactivated user is refused at the next request.
"""

from __future__ import annotations

from django.utils.translation import gettext_lazy as _
from rest_framework import authentication, exceptions
from rest_framework.authtoken.models import Token

from apexbridge.db.prepared import Param, PreparedQuery

_TOKEN = PreparedQuery(lambda: Token.objects.select_related("user").filter(key=Param("key"))[:1])


class TokenAuthentication(authentication.TokenAuthentication):
    def authenticate_credentials(self, key):
        token = _TOKEN.first(key=key)
        if token is None:
            raise exceptions.AuthenticationFailed(_("Invalid token."))
        if not token.user.is_active:
            raise exceptions.AuthenticationFailed(_("User inactive or deleted."))
        return (token.user, token)
