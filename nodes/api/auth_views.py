"""``POST /api/admin/auth/login``: a staff user's DRF token for the admin API.

Every attempt counts towards the ``login`` throttle (per client address), so
passwords cannot be guessed at speed; a refused attempt is a 401 (or 403 for a
valid account that is not staff) with the error envelope.
"""

from __future__ import annotations

import logging

from django.contrib.auth import authenticate
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework.authtoken.models import Token
from rest_framework.permissions import AllowAny
from rest_framework.response import Response
from rest_framework.throttling import ScopedRateThrottle
from rest_framework.views import APIView

from apexbridge.exceptions import ApiError
from nodes.api.serializers import ErrorResponseSerializer, LoginRequestSerializer, LoginResponseSerializer

logger = logging.getLogger(__name__)


class LoginView(APIView):
    # No session authentication here: the view must not need a CSRF token, and a
    # logged-in browser gets nothing it does not already have.
    authentication_classes: list = []
    permission_classes = [AllowAny]
    throttle_classes = [ScopedRateThrottle]
    throttle_scope = "login"

    @extend_schema(
        operation_id="admin_auth_login",
        tags=["admin auth"],
        summary="Get an API token for a staff user",
        request=LoginRequestSerializer,
        responses={
            200: LoginResponseSerializer,
            400: ErrorResponseSerializer,
            401: OpenApiResponse(ErrorResponseSerializer, description="Wrong username or password"),
            403: OpenApiResponse(ErrorResponseSerializer, description="The account is not staff"),
            429: OpenApiResponse(ErrorResponseSerializer, description="Too many attempts"),
        },
        auth=[],
    )
    def post(self, request):
        body = LoginRequestSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        user = authenticate(
            request, username=body.validated_data["username"], password=body.validated_data["password"]
        )
        client = request.META.get("REMOTE_ADDR", "?")
        if user is None or not user.is_active:
            logger.warning("admin API login refused for %r from %s", body.validated_data["username"], client)
            raise ApiError(401, "invalid_credentials", "Wrong username or password")
        if not user.is_staff:
            logger.warning("admin API login by non-staff %r from %s", user.get_username(), client)
            raise ApiError(403, "forbidden", "Only staff users may use the admin API")
        token, _created = Token.objects.get_or_create(user=user)
        logger.info("admin API token issued to %r from %s", user.get_username(), client)
        return Response({"success": True, "token": token.key})
