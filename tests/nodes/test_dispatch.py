"""Node choice (PROTOCOL §3.3): every eligibility clause, the preferences and the
waiting reasons, on unsaved model instances (no database)."""

from datetime import UTC, datetime, timedelta

from nodes import dispatch
from nodes.models import Node, Task

T0 = datetime(2025, 1, 1, tzinfo=UTC)


def make_node(node_id="n1", **fields) -> Node:
    values = {
        "status": "online",
        "connection_id": f"c-{node_id}",
        "capabilities": [],
        "tools": [],
        "draining": False,
        "max_concurrent_tasks": 1,
        "last_assigned_at": None,
    }
    values.update(fields)
    return Node(node_id=node_id, name=node_id, **values)


def make_task(**fields) -> Task:
    values = {"tool_name": "echo", "capability": "", "node_id": "", "tried_node_ids": []}
    values.update(fields)
    return Task(task_id="t-1", **values)


def choose(task, nodes, in_flight=None):
    chosen = dispatch.choose_node(task, nodes, in_flight or {})
    return chosen.node_id if chosen else None


# --- clause 1: connected, online or busy ---------------------------------------------------
def test_a_disconnected_node_is_not_eligible():
    assert choose(make_task(), [make_node(connection_id="")]) is None


def test_offline_and_unknown_nodes_are_not_eligible():
    assert choose(make_task(), [make_node(status="offline")]) is None
    assert choose(make_task(), [make_node(status="unknown")]) is None


def test_online_and_busy_nodes_are_eligible():
    assert choose(make_task(), [make_node(status="online")]) == "n1"
    assert choose(make_task(), [make_node(status="busy")]) == "n1"


# --- clause 2: capability ----------------------------------------------------------------------
def test_capability_must_be_among_the_nodes_capabilities():
    task = make_task(capability="gpu")
    assert choose(task, [make_node("a", capabilities=["cpu"])]) is None
    assert choose(task, [make_node("a", capabilities=["cpu"]), make_node("b", capabilities=["gpu"])]) == "b"


def test_a_task_without_capability_runs_anywhere():
    assert choose(make_task(), [make_node(capabilities=["gpu"])]) == "n1"


# --- clause 3: tools ---------------------------------------------------------------------------
def test_a_node_that_declared_tools_only_gets_those_tools():
    assert choose(make_task(tool_name="sha256"), [make_node(tools=["echo"])]) is None
    assert choose(make_task(tool_name="echo"), [make_node(tools=["echo"])]) == "n1"


def test_a_node_without_declared_tools_takes_any_tool():
    assert choose(make_task(tool_name="anything"), [make_node(tools=[])]) == "n1"


# --- clause 4: pin -----------------------------------------------------------------------------
def test_a_pinned_task_goes_only_to_its_node():
    nodes = [make_node("a"), make_node("b")]
    assert choose(make_task(node_id="b"), nodes) == "b"
    assert choose(make_task(node_id="c"), nodes) is None


# --- clause 5: draining ------------------------------------------------------------------------
def test_a_draining_node_gets_no_new_task():
    assert choose(make_task(), [make_node(draining=True)]) is None
    assert choose(make_task(), [make_node("a", draining=True), make_node("b")]) == "b"


# --- clause 6: free slot -----------------------------------------------------------------------
def test_a_full_node_is_not_eligible():
    node = make_node(max_concurrent_tasks=2)
    assert choose(make_task(), [node], {"n1": 1}) == "n1"
    assert choose(make_task(), [node], {"n1": 2}) is None


# --- preferences -------------------------------------------------------------------------------
def test_online_is_preferred_over_busy_even_with_more_in_flight():
    nodes = [make_node("a", status="busy", max_concurrent_tasks=5), make_node("b", max_concurrent_tasks=5)]
    assert choose(make_task(), nodes, {"a": 0, "b": 3}) == "b"


def test_fewest_in_flight_wins():
    nodes = [make_node("a", max_concurrent_tasks=5), make_node("b", max_concurrent_tasks=5)]
    assert choose(make_task(), nodes, {"a": 2, "b": 1}) == "b"


def test_ties_are_broken_round_robin_least_recently_assigned_first():
    nodes = [
        make_node("a", last_assigned_at=T0 + timedelta(seconds=2)),
        make_node("b", last_assigned_at=T0 + timedelta(seconds=1)),
        make_node("c", last_assigned_at=T0 + timedelta(seconds=3)),
    ]
    assert choose(make_task(), nodes) == "b"


def test_a_never_assigned_node_wins_a_tie():
    nodes = [make_node("a", last_assigned_at=T0), make_node("b", last_assigned_at=None)]
    assert choose(make_task(), nodes) == "b"


def test_round_robin_spreads_over_equal_nodes():
    nodes = [make_node(name, max_concurrent_tasks=10) for name in ("a", "b", "c")]
    picks = []
    for i in range(6):
        chosen = dispatch.choose_node(make_task(), nodes, {})
        chosen.last_assigned_at = T0 + timedelta(seconds=i)
        picks.append(chosen.node_id)
    assert sorted(picks[:3]) == ["a", "b", "c"] and picks[3:] == picks[:3]


def test_a_retry_prefers_a_node_it_has_not_tried():
    nodes = [make_node("a"), make_node("b", status="busy")]
    assert choose(make_task(tried_node_ids=["a"]), nodes) == "b"


def test_a_retry_goes_back_to_a_tried_node_when_no_other_is_eligible():
    nodes = [make_node("a"), make_node("b", connection_id="")]
    assert choose(make_task(tried_node_ids=["a"]), nodes) == "a"


# --- waiting reasons ----------------------------------------------------------------------------
def reason(task, nodes, in_flight=None):
    return dispatch.waiting_reason(task, nodes, in_flight or {})


def test_waiting_reasons_say_why():
    assert reason(make_task(), []) == "no node is connected"
    assert reason(make_task(capability="x"), [make_node()]) == "no connected node has capability 'x'"
    assert (
        reason(make_task(tool_name="y"), [make_node(tools=["echo"])]) == "no connected node offers tool 'y'"
    )
    assert reason(make_task(node_id="p"), [make_node()]) == "pinned node 'p' is not connected"
    assert reason(make_task(), [make_node(draining=True)]) == "every suitable node is draining"
    assert "limit of 1" in reason(make_task(), [make_node()], {"n1": 1})
    assert "all 2 suitable nodes" in reason(make_task(), [make_node("a"), make_node("b")], {"a": 1, "b": 1})


def test_no_waiting_reason_when_a_node_is_eligible():
    assert reason(make_task(), [make_node()]) == ""


# --- the dispatch pass's index: the same answers without a scan per task --------------------
def random_fleet(rng, size):
    caps, tools = ["files", "music", "books"], ["read", "write", "play"]
    nodes = {}
    for i in range(size):
        node_id = f"n{i:03d}"
        nodes[node_id] = make_node(
            node_id,
            status=rng.choice(["online", "online", "busy", "offline"]),
            connection_id=rng.choice([f"c{i}", f"c{i}", ""]),
            capabilities=rng.sample(caps, rng.randint(0, 2)),
            tools=rng.sample(tools, rng.randint(0, 2)),
            draining=rng.random() < 0.1,
            max_concurrent_tasks=rng.randint(1, 3),
            last_assigned_at=rng.choice([None, T0 + timedelta(seconds=rng.randint(0, 5))]),
        )
    in_flight = {node_id: rng.randint(0, 2) for node_id in nodes if rng.random() < 0.5}
    return nodes, in_flight


def random_task(rng, nodes):
    return make_task(
        tool_name=rng.choice(["read", "write", "play"]),
        capability=rng.choice(["", "", "files", "music", "books"]),
        node_id=rng.choice([""] * 8 + ([rng.choice(list(nodes))] if nodes else [])),
        tried_node_ids=rng.choice([[]] * 6 + [rng.sample(list(nodes), min(2, len(nodes)))]),
    )


def test_the_free_node_index_chooses_what_choose_node_chooses_as_a_pass_assigns():
    """Random fleets, a pass assigning tasks one after another: after every assignment,
    and after nodes change under it (a fresher row, a disconnect), the index answers
    exactly what a scan of every node answers."""
    import random

    for seed in range(40):
        rng = random.Random(seed)
        nodes, in_flight = random_fleet(rng, rng.randint(1, 30))
        index = dispatch.FreeNodeIndex(nodes, in_flight)
        now = T0 + timedelta(seconds=10)
        for step in range(60):
            task = random_task(rng, nodes)
            expected = dispatch.choose_node(task, nodes.values(), in_flight)
            chosen = index.choose(task)
            assert chosen is expected, (seed, step)
            takes_more = [
                n
                for n in nodes.values()
                if dispatch.is_connected(n)
                and dispatch.accepts_new_work(n)
                and dispatch.has_free_slot(n, in_flight.get(n.node_id, 0))
            ]
            assert index.any_free() == bool(takes_more), (seed, step)
            if chosen is not None:  # assigned: one more in flight, assigned just now
                in_flight[chosen.node_id] = in_flight.get(chosen.node_id, 0) + 1
                now += timedelta(milliseconds=1)
                chosen.last_assigned_at = now
                index.update(chosen.node_id)
            if nodes and rng.random() < 0.2:  # a claim found the row out of date
                node_id = rng.choice(list(nodes))
                if rng.random() < 0.3:
                    nodes.pop(node_id)
                else:
                    node = nodes[node_id]
                    node.status = rng.choice(["online", "busy"])
                    node.draining = rng.random() < 0.2
                    node.max_concurrent_tasks = rng.randint(1, 4)
                    in_flight[node_id] = rng.randint(0, 3)
                index.update(node_id)


def test_an_index_kept_for_the_next_pass_answers_as_one_built_for_it():
    """Between passes, rows change (a node re-registers, disconnects, is drained) and
    in-flight counts change (tasks end, other processes assign): an index brought up
    to date with ``set_row`` and ``set_in_flight`` answers exactly what one built
    from scratch over the same rows and counts answers, pass after pass."""
    import random

    for seed in range(40):
        rng = random.Random(seed)
        nodes, in_flight = random_fleet(rng, rng.randint(1, 30))
        kept = dispatch.FreeNodeIndex(dict(nodes), dict(in_flight))
        now = T0 + timedelta(seconds=10)
        for pass_number in range(15):
            # Between passes: some rows replaced or gone, counts read anew
            for node_id in rng.sample(sorted(nodes), min(len(nodes), rng.randint(0, 4))):
                if rng.random() < 0.3:
                    nodes.pop(node_id)
                    kept.set_row(node_id, None)
                else:
                    row = make_node(
                        node_id,
                        status=rng.choice(["online", "busy", "offline"]),
                        connection_id=rng.choice([f"c-{node_id}", ""]),
                        capabilities=nodes[node_id].capabilities,
                        tools=nodes[node_id].tools,
                        draining=rng.random() < 0.2,
                        max_concurrent_tasks=rng.randint(1, 4),
                        last_assigned_at=now,
                    )
                    nodes[node_id] = row
                    kept.set_row(node_id, row)
            in_flight = {node_id: rng.randint(0, 3) for node_id in nodes if rng.random() < 0.5}
            kept.set_in_flight(in_flight)
            fresh = dispatch.FreeNodeIndex(dict(nodes), dict(in_flight))
            # The pass: both assign the same tasks to the same nodes
            for step in range(10):
                task = random_task(rng, nodes)
                chosen = kept.choose(task)
                expected = fresh.choose(task)
                where = (seed, pass_number, step)
                assert (chosen and chosen.node_id) == (expected and expected.node_id), where
                assert kept.any_free() == fresh.any_free(), where
                if chosen is not None:
                    now += timedelta(milliseconds=1)
                    row = make_node(
                        chosen.node_id,
                        status=chosen.status,
                        connection_id=chosen.connection_id,
                        capabilities=chosen.capabilities,
                        tools=chosen.tools,
                        draining=chosen.draining,
                        max_concurrent_tasks=chosen.max_concurrent_tasks,
                        last_assigned_at=now,
                    )
                    for index in (kept, fresh):
                        index.in_flight[chosen.node_id] = index.in_flight.get(chosen.node_id, 0) + 1
                        index.set_row(chosen.node_id, row)
                    nodes[chosen.node_id] = row
                    in_flight[chosen.node_id] = in_flight.get(chosen.node_id, 0) + 1
