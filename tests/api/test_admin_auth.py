"""``POST /api/admin/auth/login`` and who may use the admin API at all."""

from __future__ import annotations

import pytest
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

pytestmark = pytest.mark.django_db

LOGIN = "/api/admin/auth/login"


def assert_error(response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.content
    body = response.json()
    assert body["success"] is False
    assert set(body["error"]) >= {"code", "message"}
    if code is not None:
        assert body["error"]["code"] == code
    return body


def test_login_gives_a_token_that_opens_the_api(staff_user):
    response = APIClient().post(LOGIN, {"username": "staff", "password": "staff-password-1"}, format="json")
    assert response.status_code == 200
    body = response.json()
    assert body == {"success": True, "token": Token.objects.get(user=staff_user).key}

    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {body['token']}")
    assert client.get("/api/admin/nodes").json()["success"] is True


def test_login_twice_returns_the_same_token(staff_user):
    first = APIClient().post(LOGIN, {"username": "staff", "password": "staff-password-1"}, format="json")
    second = APIClient().post(
        LOGIN + "/", {"username": "staff", "password": "staff-password-1"}, format="json"
    )
    assert first.json()["token"] == second.json()["token"]


def test_wrong_password_is_401_with_the_error_envelope(staff_user):
    response = APIClient().post(LOGIN, {"username": "staff", "password": "nope"}, format="json")
    assert_error(response, 401, "invalid_credentials")
    assert not Token.objects.exists()


def test_unknown_user_is_401(db):
    response = APIClient().post(LOGIN, {"username": "ghost", "password": "x"}, format="json")
    assert_error(response, 401, "invalid_credentials")


def test_non_staff_gets_no_token(plain_user):
    response = APIClient().post(LOGIN, {"username": "plain", "password": "plain-password-1"}, format="json")
    assert_error(response, 403, "forbidden")
    assert not Token.objects.exists()


def test_inactive_staff_gets_no_token(staff_user):
    staff_user.is_active = False
    staff_user.save()
    response = APIClient().post(LOGIN, {"username": "staff", "password": "staff-password-1"}, format="json")
    assert_error(response, 401)


def test_missing_fields_are_400(db):
    body = assert_error(APIClient().post(LOGIN, {"username": "staff"}, format="json"), 400, "invalid_payload")
    assert "password" in body["error"]["message"]


def test_login_is_throttled_against_guessing(staff_user, settings):
    # Given the default rate (10 attempts a minute per client)
    client = APIClient()
    for _ in range(10):
        assert (
            client.post(LOGIN, {"username": "staff", "password": "guess"}, format="json").status_code == 401
        )
    # Then even the right password is refused for a while
    response = client.post(LOGIN, {"username": "staff", "password": "staff-password-1"}, format="json")
    body = assert_error(response, 429, "throttled")
    assert body["error"]["retryAfter"] > 0
    assert "Retry-After" in response.headers


def test_login_needs_no_csrf_token_even_with_a_session(staff_user):
    client = APIClient(enforce_csrf_checks=True)
    client.force_login(staff_user)
    response = client.post(LOGIN, {"username": "staff", "password": "staff-password-1"}, format="json")
    assert response.status_code == 200


@pytest.mark.parametrize(
    "method,path",
    [
        ("get", "/api/admin/nodes"),
        ("get", "/api/admin/nodes/n1"),
        ("get", "/api/admin/nodes/n1/stats"),
        ("get", "/api/admin/nodes/n1/logs"),
        ("get", "/api/admin/nodes/n1/tasks"),
        ("post", "/api/admin/nodes/n1/heartbeat-check"),
        ("post", "/api/admin/nodes/n1/control"),
        ("delete", "/api/admin/nodes/n1"),
        ("get", "/api/admin/stats"),
        ("get", "/api/admin/tasks"),
        ("get", "/api/admin/quotas/n1"),
    ],
)
def test_every_endpoint_refuses_anonymous_and_non_staff(method, path, plain_client, make_node):
    make_node("n1")
    assert_error(getattr(APIClient(), method)(path), 401, "not_authenticated")
    bad = APIClient()
    bad.credentials(HTTP_AUTHORIZATION="Token not-a-real-token")
    assert_error(getattr(bad, method)(path), 401)
    assert_error(getattr(plain_client, method)(path), 403, "forbidden")


def test_admin_session_works_for_staff(staff_user, make_node):
    make_node("n1")
    client = APIClient()
    client.force_login(staff_user)
    assert client.get("/api/admin/nodes/n1").json()["node"]["nodeId"] == "n1"


def test_session_writes_need_the_csrf_token(staff_user, make_node):
    make_node("n1")
    client = APIClient(enforce_csrf_checks=True)
    client.force_login(staff_user)
    assert_error(client.post("/api/admin/nodes/n1/control", {"action": "drain"}, format="json"), 403)
