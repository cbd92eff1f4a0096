"""The task API's body and query serializers share one set of fields per class
(``FieldsBuiltOnce``): requests validated at the same time in several threads must
each get their own answer, exactly as with fields of their own."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from rest_framework import serializers

from nodes.api.task_serializers import TaskSubmitSerializer, WaitQuerySerializer

BODIES = [
    # body, expected errors (field names), expected values of the valid ones
    ({"toolName": "echo", "priority": 3, "toolArgs": {"n": 1}}, set(), {"priority": 3, "toolArgs": {"n": 1}}),
    ({"toolName": "echo"}, set(), {"priority": 5, "toolArgs": {}, "dependsOn": []}),
    ({"toolName": 5}, {"toolName"}, None),
    ({"toolName": "echo", "priority": 11, "nodeId": "not an id"}, {"priority", "nodeId"}, None),
    ({"toolName": "echo", "dependsOn": ["t"] * 101, "timeout": 0}, {"dependsOn", "timeout"}, None),
]


class PlainTaskSubmitSerializer(TaskSubmitSerializer):
    """The same serializer with its fields copied per instance, as DRF does by default."""

    fields = serializers.Serializer.fields


def answer(serializer_class, body):
    serializer = serializer_class(data=body)
    if serializer.is_valid():
        return "valid", dict(serializer.validated_data)
    return "invalid", {name: [str(e) for e in errors] for name, errors in serializer.errors.items()}


def test_each_body_gets_the_answer_fields_of_its_own_would_give():
    for body, errors, values in BODIES:
        shared = answer(TaskSubmitSerializer, body)
        assert shared == answer(PlainTaskSubmitSerializer, body)
        if errors:
            assert shared[0] == "invalid" and set(shared[1]) == errors
        else:
            assert shared[0] == "valid"
            assert {name: shared[1][name] for name in values} == values


def test_bodies_validated_at_once_in_several_threads_keep_their_own_errors_and_values():
    expected = [answer(PlainTaskSubmitSerializer, body) for body, _, _ in BODIES]

    def validate_many(offset: int) -> list[bool]:
        return [
            answer(TaskSubmitSerializer, BODIES[(offset + i) % len(BODIES)][0])
            == expected[(offset + i) % len(BODIES)]
            for i in range(300)
        ]

    with ThreadPoolExecutor(8) as pool:
        results = [ok for batch in pool.map(validate_many, range(8)) for ok in batch]
    assert all(results)
    assert len(results) == 8 * 300


def test_the_wait_query_still_defaults_and_refuses_as_declared():
    assert answer(WaitQuerySerializer, {}) == ("valid", {"wait": 0})
    assert answer(WaitQuerySerializer, {"wait": "2.5"}) == ("valid", {"wait": 2.5})
    state, errors = answer(WaitQuerySerializer, {"wait": "61"})
    assert state == "invalid" and list(errors) == ["wait"]


def test_a_partial_body_or_one_with_a_context_gets_fields_of_its_own():
    partial = TaskSubmitSerializer(data={"priority": 3}, partial=True)
    assert partial.is_valid(), partial.errors  # no toolName needed, and no defaults filled in
    assert dict(partial.validated_data) == {"priority": 3}
    assert partial.fields is not TaskSubmitSerializer().fields
    with_context = TaskSubmitSerializer(data={"toolName": "echo"}, context={"request": None})
    assert with_context.fields is with_context.fields  # built once for the instance
    assert with_context.fields is not TaskSubmitSerializer().fields
    assert TaskSubmitSerializer().fields is TaskSubmitSerializer().fields
