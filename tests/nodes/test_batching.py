"""Database work coalesced into batches (nodes/batching.py): a storm of
``node_register`` (``registration_services.node_register_many``) and of handshake key checks
(``auth.authenticate_keys``) is handled in batches, and every node still gets its
own answer, refusal or error."""

from __future__ import annotations

import asyncio
import threading

import pytest
from channels.db import database_sync_to_async
from django.db import IntegrityError, OperationalError, connections, transaction

from nodes import registration_services
from nodes.auth import KeyIdentity
from nodes.batching import DatabaseBatcher, _register_many
from nodes.models import Node, NodeKey, NodeLog
from nodes.node_rows import node_rows
from nodes.protocol import NodeRegisterPayload, ProtocolError

SHARED = KeyIdentity(kind="shared", name="shared")

# Every batcher hop closes the database thread's old connections, which touches a
# connection an earlier test in the same worker may have left open there: the tests
# without a database of their own still need database access allowed.
pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
async def _database_thread_closed():
    """The asserts' async ORM calls leave a connection open on the database thread;
    PostgreSQL will not drop the test database while one is."""
    from channels.db import database_sync_to_async
    from django.db import connections

    yield
    await database_sync_to_async(connections.close_all)()


def registration_batcher(max_batch: int = 100) -> DatabaseBatcher:
    return DatabaseBatcher(_register_many, what="registrations", max_batch=max_batch, key=lambda r: r.node_id)


def registration(node_id: str | None, n: int = 1, identity: KeyIdentity = SHARED, **fields):
    data = {"nodeId": node_id, "name": fields.pop("name", node_id or "anon"), "capabilities": []}
    data.update(fields)
    payload = NodeRegisterPayload.model_validate({k: v for k, v in data.items() if v is not None})
    connection = registration_services.Connection(
        connection_id=f"c-{n}", channel_name=f"chan-{n}", process_id="hub-test"
    )
    return registration_services.NodeRegistration(payload, connection, identity)


# --- the service: one transaction, one outcome per registration -----------------------------
@pytest.mark.django_db
def test_one_batch_registers_new_and_known_nodes_and_refuses_only_the_bad_one(
    settings, django_capture_on_commit_callbacks
):
    settings.APEXBRIDGE_MAX_NODES = 3
    earlier = registration("known")
    registration_services.node_register(
        payload=earlier.payload, connection=earlier.connection, identity=SHARED
    )
    Node.objects.filter(pk="known").update(completed_tasks=7, draining=True)
    bound = KeyIdentity(kind="node", key_id=None, name="k", node_id="only-me")
    batch = [
        registration("new-1", 2, capabilities=["echo"]),
        registration("known", 3, name="Known again"),
        registration("someone-else", 4, identity=bound),  # the key may not
        registration("new-2", 5),
        registration("new-3", 6),  # a fourth node: over APEXBRIDGE_MAX_NODES
    ]
    with django_capture_on_commit_callbacks() as published:
        outcomes = registration_services.node_register_many(registrations=batch)

    assert [type(o).__name__ for o in outcomes] == [
        "RegistrationResult",
        "RegistrationResult",
        "ProtocolError",
        "RegistrationResult",
        "ProtocolError",
    ]
    assert outcomes[0].created and not outcomes[1].created
    assert outcomes[1].replaced_channel_name == "chan-1"  # the older socket gets 4000
    assert (outcomes[2].code, outcomes[4].code) == ("forbidden", "node_limit_reached")
    assert set(Node.objects.values_list("pk", flat=True)) == {"known", "new-1", "new-2"}
    known = Node.objects.get(pk="known")
    # A re-registration keeps hub-kept statistics and the admin's draining flag.
    assert (known.name, known.connection_id, known.completed_tasks, known.draining) == (
        "Known again",
        "c-3",
        7,
        True,
    )
    assert Node.objects.get(pk="new-1").capabilities == ["echo"]
    assert NodeLog.objects.filter(event="node_registered").count() == 4  # 1 earlier + 3
    # node_registered for each of the 3; node_status_changed only for the 2 new ones.
    events = [c for c in published if getattr(c, "__self__", None) is not node_rows]
    assert len(events) == 5


@pytest.mark.django_db(transaction=True)
def test_two_processes_admitting_new_nodes_at_once_cannot_overshoot_the_node_limit(settings):
    """Process A has admitted the last allowed node and not yet committed; process B's
    batch of new nodes must wait for A and then count A's node (PostgreSQL: the
    admission lock; SQLite: BEGIN IMMEDIATE)."""
    settings.APEXBRIDGE_MAX_NODES = 1
    a_admitted, a_may_commit = threading.Event(), threading.Event()
    b_outcomes: list = []

    def process_a() -> None:
        try:
            with transaction.atomic():
                registration_services.node_register_many(registrations=[registration("from-a", 1)])
                a_admitted.set()
                a_may_commit.wait(10)
        finally:
            connections.close_all()

    def process_b() -> None:
        try:
            b_outcomes.extend(
                registration_services.node_register_many(registrations=[registration("from-b", 2)])
            )
        finally:
            connections.close_all()

    a = threading.Thread(target=process_a)
    a.start()
    assert a_admitted.wait(10)
    b = threading.Thread(target=process_b)
    b.start()
    b.join(1)
    finished_before_a_committed = not b.is_alive()
    a_may_commit.set()
    a.join(10)
    b.join(30)

    assert not finished_before_a_committed  # B waited for A's admission to end
    assert [getattr(outcome, "code", None) for outcome in b_outcomes] == ["node_limit_reached"]
    assert list(Node.objects.values_list("pk", flat=True)) == ["from-a"]


@pytest.mark.django_db
def test_a_batch_names_each_node_id_once():
    with pytest.raises(ValueError):
        registration_services.node_register_many(
            registrations=[registration("twice", 1), registration("twice", 2)]
        )
    assert not Node.objects.exists()


@pytest.mark.django_db
def test_a_registration_without_a_node_id_gets_the_keys_or_a_new_one():
    bound = KeyIdentity(kind="node", key_id=None, name="k", node_id="from-key")
    outcomes = registration_services.node_register_many(
        registrations=[registration(None, 1, identity=bound), registration(None, 2)]
    )
    assert outcomes[0].node.node_id == "from-key"
    assert outcomes[1].node.node_id.startswith("node-")


# --- the batcher: a storm in few database hops --------------------------------------------
@pytest.mark.django_db(transaction=True)
async def test_a_storm_is_written_in_batches_and_every_node_is_answered(monkeypatch):
    calls: list[int] = []
    real = registration_services.node_register_many

    def counted(*, registrations):
        calls.append(len(registrations))
        return real(registrations=registrations)

    monkeypatch.setattr(registration_services, "node_register_many", counted)
    batcher = registration_batcher(max_batch=10)
    results = await asyncio.gather(*(batcher.submit(registration(f"s-{i}", i)) for i in range(25)))

    assert [r.node.node_id for r in results] == [f"s-{i}" for i in range(25)]
    assert calls == [10, 10, 5]  # the first batch starts at once; the rest waited for it
    assert await Node.objects.filter(connection_id__startswith="c-").acount() == 25


@pytest.mark.django_db(transaction=True)
async def test_the_same_node_repeated_in_a_storm_ends_on_its_latest_connection():
    batcher = registration_batcher()
    first, second, third = await asyncio.gather(*(batcher.submit(registration("dup", n)) for n in (1, 2, 3)))
    assert first.created and not second.created and not third.created
    # Each later socket takes over from the one before (which is closed with 4000).
    assert (second.replaced_channel_name, third.replaced_channel_name) == ("chan-1", "chan-2")
    assert (await Node.objects.aget(pk="dup")).connection_id == "c-3"


@pytest.mark.django_db(transaction=True)
async def test_a_refusal_reaches_only_its_own_node():
    bound = KeyIdentity(kind="node", key_id=None, name="k", node_id="only-me")
    batcher = registration_batcher()
    outcomes = await asyncio.gather(
        batcher.submit(registration("ok-1", 1)),
        batcher.submit(registration("not-me", 2, identity=bound)),
        batcher.submit(registration("ok-2", 3)),
        return_exceptions=True,
    )
    assert isinstance(outcomes[1], ProtocolError) and outcomes[1].code == "forbidden"
    assert [o.node.node_id for o in (outcomes[0], outcomes[2])] == ["ok-1", "ok-2"]


@pytest.mark.django_db(transaction=True)
async def test_a_failed_batch_is_written_one_by_one_so_only_the_bad_one_fails(monkeypatch, caplog):
    real = registration_services.node_register_many

    def collides(*, registrations):
        if any(r.node_id == "racy" for r in registrations):  # another process inserted it
            raise IntegrityError("UNIQUE constraint failed: nodes_node.node_id")
        return real(registrations=registrations)

    monkeypatch.setattr(registration_services, "node_register_many", collides)
    batcher = registration_batcher()
    outcomes = await asyncio.gather(
        *(batcher.submit(registration(node_id, n)) for n, node_id in enumerate(["a", "racy", "b"])),
        return_exceptions=True,
    )
    assert isinstance(outcomes[1], IntegrityError)
    assert [outcomes[0].node.node_id, outcomes[2].node.node_id] == ["a", "b"]
    assert sorted([pk async for pk in Node.objects.values_list("pk", flat=True)]) == ["a", "b"]
    assert "a batch of 3 registrations failed (IntegrityError" in caplog.text


@pytest.mark.django_db(transaction=True)
async def test_without_the_database_every_node_in_the_batch_hears_it_once(monkeypatch):
    calls: list[int] = []

    def refused(*, registrations):
        calls.append(len(registrations))
        raise OperationalError("could not connect to server")

    monkeypatch.setattr(registration_services, "node_register_many", refused)
    batcher = registration_batcher()
    outcomes = await asyncio.gather(
        *(batcher.submit(registration(f"o-{i}", i)) for i in range(4)), return_exceptions=True
    )
    assert all(isinstance(o, OperationalError) for o in outcomes)
    assert calls == [4]  # one attempt for the batch: no one-by-one retry of an outage


@pytest.mark.django_db(transaction=True)
async def test_a_registration_whose_connection_went_away_before_its_batch_is_not_written(monkeypatch):
    started, release = asyncio.Event(), asyncio.Event()

    async def first_batch_waits(registrations):
        started.set()
        await release.wait()
        return await DatabaseBatcher._handle(batcher, registrations)

    batcher = registration_batcher()
    monkeypatch.setattr(batcher, "_handle", first_batch_waits)
    first = asyncio.create_task(batcher.submit(registration("first", 1)))
    await started.wait()
    gone = asyncio.create_task(batcher.submit(registration("gone", 2)))
    await asyncio.sleep(0)
    gone.cancel()
    release.set()
    assert (await first).node.node_id == "first"
    await batcher._worker  # every batch handled
    assert await Node.objects.filter(pk="gone").aexists() is False


@pytest.mark.django_db(transaction=True)
async def test_a_task_result_whose_handler_was_cancelled_while_waiting_is_still_applied(monkeypatch):
    from nodes import task_queue, task_result_services, task_services
    from nodes.batching import task_results
    from nodes.models import Task

    def assigned(task_id: str) -> str:
        Node.objects.get_or_create(
            node_id="n1",
            defaults={"name": "n1", "status": "online", "connection_id": "c-n1", "channel_name": "x"},
        )
        Node.objects.filter(pk="n1").update(max_concurrent_tasks=5)
        task = task_services.task_submit(tool_name="echo", idempotency_key=task_id).task
        task_queue.claim_task(task.task_id, "n1")
        return task.task_id

    first_id, late_id = [await database_sync_to_async(assigned)(key) for key in ("a", "b")]
    started, release = asyncio.Event(), asyncio.Event()
    batcher = task_results  # the hub's own: results whose handler went away are still written

    async def first_batch_waits(results, **kwargs):
        started.set()
        await release.wait()
        return await DatabaseBatcher._handle(batcher, results, **kwargs)

    monkeypatch.setattr(batcher, "_handle", first_batch_waits)
    first = asyncio.create_task(
        batcher.submit(task_result_services.TaskResult(first_id, "n1", "c-n1", True, result=1))
    )
    await started.wait()
    # The hub shuts down while this result waits for the next batch
    late = asyncio.create_task(
        batcher.submit(task_result_services.TaskResult(late_id, "n1", "c-n1", True, result=2))
    )
    await asyncio.sleep(0)
    late.cancel()
    release.set()
    assert (await first).status == "succeeded"
    await batcher._worker
    # The node's work is not lost: its result is written all the same
    assert (await Task.objects.aget(pk=late_id)).result == 2


@pytest.mark.django_db(transaction=True)
async def test_the_same_result_sent_twice_at_once_is_applied_once_and_the_repeat_is_stale():
    from nodes import task_queue, task_result_services, task_services
    from nodes.batching import task_results
    from nodes.models import Task

    def assigned() -> str:
        defaults = {"name": "n1", "status": "online", "connection_id": "c-n1", "channel_name": "x"}
        Node.objects.get_or_create(node_id="n1", defaults=defaults)
        task = task_services.task_submit(tool_name="echo").task
        task_queue.claim_task(task.task_id, "n1")
        return task.task_id

    task_id = await database_sync_to_async(assigned)()
    first, again = await asyncio.gather(
        task_results.submit(task_result_services.TaskResult(task_id, "n1", "c-n1", True, result=1)),
        task_results.submit(task_result_services.TaskResult(task_id, "n1", "c-n1", True, result=2)),
        return_exceptions=True,
    )
    assert first.status == "succeeded"
    assert isinstance(again, ProtocolError) and again.code == "stale_result"
    done = await Task.objects.aget(pk=task_id)
    assert done.result == 1  # the repeat changed nothing
    assert (await Node.objects.aget(pk="n1")).completed_tasks == 1


async def test_a_batch_that_meets_a_deadlock_is_tried_again_not_reported_as_an_outage():
    class Deadlock(Exception):
        sqlstate = "40P01"

    attempts: list[list[int]] = []

    def handle_many(items):
        attempts.append(list(items))
        if len(attempts) == 1:
            raise OperationalError("deadlock detected") from Deadlock()
        return [item * 10 for item in items]

    batcher = DatabaseBatcher(handle_many, what="numbers")
    assert await asyncio.gather(batcher.submit(1), batcher.submit(2)) == [10, 20]
    assert attempts == [[1, 2], [1, 2]]  # the batch, then the same batch again


# --- handshake key checks ------------------------------------------------------------------
@pytest.mark.django_db
def test_many_keys_are_checked_with_one_select_and_one_update(settings, django_assert_num_queries):
    from nodes.auth import authenticate_keys, node_key_create, node_key_revoke

    settings.APEXBRIDGE_VCP_KEY = "the-shared-key"
    good, good_plain = node_key_create(name="good", node_id="bound-1")
    other, other_plain = node_key_create(name="other")
    revoked, revoked_plain = node_key_create(name="revoked")
    node_key_revoke(key=revoked)
    presented = [
        good_plain,
        revoked_plain,
        other_plain[:-1] + ("x" if other_plain[-1] != "x" else "y"),  # right prefix, wrong secret
        "the-shared-key",
        "not-a-key",
        None,
        "abk_" + "f" * 600,  # too long
        other_plain,
    ]
    with django_assert_num_queries(2):
        identities = authenticate_keys(presented)
    assert [i.name if i else None for i in identities] == [
        "good", None, None, "shared", None, None, None, "other"
    ]  # fmt: skip
    assert identities[0].node_id == "bound-1"
    used = dict(NodeKey.objects.values_list("name", "last_used_at"))
    assert used["good"] and used["other"] and used["revoked"] is None


@pytest.mark.django_db(transaction=True)
async def test_a_handshake_storm_with_per_node_keys_checks_them_in_batches(monkeypatch):
    from channels.db import database_sync_to_async

    from nodes import auth
    from nodes.auth import node_key_create
    from nodes.batching import _authenticate_many

    keys = [(await database_sync_to_async(node_key_create)(name=f"k{n}"))[1] for n in range(20)]
    calls: list[int] = []
    real = auth.authenticate_keys

    def counted(presented):
        calls.append(len(presented))
        return real(presented)

    monkeypatch.setattr(auth, "authenticate_keys", counted)
    batcher = DatabaseBatcher(_authenticate_many, what="key checks", max_batch=8)
    identities = await asyncio.gather(*(batcher.submit(key) for key in keys + ["abk_00000000_wrong"]))

    assert [identity.name if identity else None for identity in identities] == [
        f"k{n}" for n in range(20)
    ] + [None]
    assert calls == [8, 8, 5]  # 21 handshakes, three database hops


@pytest.mark.django_db(transaction=True)
async def test_a_storm_leaves_no_database_connection_open():
    # CONN_MAX_AGE = 0: each hop's connection is closed when the hop ends. Channels
    # closes connections outside the context a hop runs in, which missed the ones
    # opened by hops that a consumer had started (key-check and registration batches,
    # dispatch passes): PostgreSQL kept an idle session, and the test database could
    # not be dropped (apexbridge/db/hops.py).
    from django.db import connection

    from apexbridge.db.hops import database_sync_to_async
    from nodes.auth import node_key_create
    from tests.conftest import close_communicator, open_node_socket

    keys = [(await database_sync_to_async(node_key_create)(name=f"k{n}"))[1] for n in range(3)]
    opened = await asyncio.gather(*(open_node_socket(f"/abp-distributed-server/ABP_Key={k}") for k in keys))
    try:
        assert all(connected for _, connected, _ in opened)
        await asyncio.gather(*(node.register(f"leak-{n}") for n, (node, _, _) in enumerate(opened)))
        await asyncio.sleep(0.2)  # the dispatch pass after the registrations
        assert await database_sync_to_async(lambda: connection.connection is None)()
    finally:
        for node, _, _ in opened:
            await close_communicator(node.communicator)


async def test_an_outage_during_the_one_by_one_retry_is_answered_to_the_rest_at_once():
    calls: list[int] = []

    def handle_many(items):
        calls.append(len(items))
        if len(items) > 1:
            raise IntegrityError("one bad item")
        raise OperationalError("could not connect to server")  # the database went away

    batcher = DatabaseBatcher(handle_many, what="items")
    outcomes = await asyncio.gather(*(batcher.submit(n) for n in range(4)), return_exceptions=True)
    assert all(isinstance(o, OperationalError) for o in outcomes)
    assert calls == [4, 1]  # not one attempt per item against a database that is down


async def test_a_batch_function_that_miscounts_fails_every_caller_instead_of_hanging():
    batcher = DatabaseBatcher(lambda items: items[:-1], what="items")
    outcomes = await asyncio.wait_for(
        asyncio.gather(*(batcher.submit(n) for n in range(3)), return_exceptions=True), 5
    )
    messages = [str(outcome) for outcome in outcomes]
    assert messages == ["items: 2 outcomes for 3 items"] * 3
