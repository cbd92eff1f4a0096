"""Hot statements built by the ORM once, then run again with new values.

Building a query's SQL costs more than running it on SQLite: under the task
benchmark a hub spent about 30 % of its CPU building SQL (``QuerySet.filter``, the
compiler) and 4 % running it. A :class:`PreparedQuery` is written as an ordinary
queryset whose changing values are :class:`Param` placeholders; the ORM compiles it
once per database connection alias (and vendor), and each run only fills in the
values, executes the SQL and turns the rows into what the queryset would have
returned (model instances, ``values_list`` tuples or flat values), through the same
field converters the ORM uses. :class:`PreparedUpdate` does the same for
``QuerySet.update``.

Only for the statements on the task path that run several times per task; anything
else stays a plain queryset. A queryset that needs a shape this module does not
handle (``values()`` dicts, ``prefetch_related``, ``in`` lists of changing length)
is refused when it is first compiled, not silently run differently.

A parameter's value is made ready for the database by its ``field`` (like a value
given to ``filter()`` or ``update()``: a ``DateTimeField`` made naive text on
SQLite, a ``JSONField`` dumped); a ``Param`` without a field passes its value as is
(strings, integers, booleans).
"""

from __future__ import annotations

import operator
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from django.db import DEFAULT_DB_ALIAS, DatabaseError, connections, transaction
from django.db.models import Expression, Field, QuerySet
from django.db.models.query import (
    FlatValuesListIterable,
    ModelIterable,
    ValuesListIterable,
    get_related_populators,
)
from django.db.models.sql import InsertQuery, UpdateQuery
from django.db.transaction import TransactionManagementError


class _Slot:
    """Stands for a parameter's value in the compiled SQL's parameter list (shared
    by the copies the ORM makes of a ``Param`` while it resolves the query)."""

    __slots__ = ("name", "field", "for_save")

    def __init__(self, name: str, field: Field | None) -> None:
        self.name = name
        self.field = field
        self.for_save = False

    def __repr__(self) -> str:
        return f"Param({self.name!r})"


class Param(Expression):
    """A value given when a prepared statement runs: ``filter(pk=Param("task_id"))``."""

    def __init__(self, name: str, field: Field | None = None) -> None:
        super().__init__(output_field=field)
        self.name = name
        self.slot = _Slot(name, field)

    def resolve_expression(self, query=None, allow_joins=True, reuse=None, summarize=False, for_save=False):
        resolved = super().resolve_expression(query, allow_joins, reuse, summarize, for_save)
        if for_save:
            resolved.slot.for_save = True
        return resolved

    def as_sql(self, compiler, connection):
        return "%s", [self.slot]

    @property
    def identity(self):  # two placeholders are never the same expression
        return (Param, id(self.slot))

    def __hash__(self) -> int:
        return hash(self.identity)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Param) and other.slot is self.slot


@dataclass(frozen=True)
class _Compiled:
    sql: str
    params: tuple  # fixed values, and a _Slot where a value is given per run
    slots: tuple[tuple[int, _Slot], ...]
    vendor: str

    def values_for(self, given: Mapping[str, Any], connection) -> list:
        params = list(self.params)
        for position, slot in self.slots:
            try:
                value = given[slot.name]
            except KeyError:
                raise TypeError(f"prepared statement: no value for {slot.name!r}") from None
            if slot.field is not None:
                if slot.for_save:
                    value = slot.field.get_db_prep_save(value, connection)
                else:
                    value = slot.field.get_db_prep_value(value, connection, prepared=False)
            params[position] = value
        return params


def _with_slots(sql: str, params: tuple | list, vendor: str) -> _Compiled:
    slots = tuple((i, p) for i, p in enumerate(params) if isinstance(p, _Slot))
    return _Compiled(sql=sql, params=tuple(params), slots=slots, vendor=vendor)


class _PerConnection:
    """What is compiled, per connection alias (recompiled if the alias's vendor
    changed, as it does when tests swap databases)."""

    def __init__(self, using: str) -> None:
        self.using = using
        self._by_alias: dict[str, Any] = {}
        self._lock = threading.Lock()

    def get(self, connection, compile_: Callable[[Any], Any]) -> Any:
        entry = self._by_alias.get(connection.alias)
        if entry is None or entry.vendor != connection.vendor:
            with self._lock:
                entry = compile_(connection)
                self._by_alias[connection.alias] = entry
        return entry


@dataclass(frozen=True)
class _CompiledSelect(_Compiled):
    converters: tuple = ()  # (position, converters, expression)
    shape: str = "model"  # model | tuples | flat
    model: Any = None
    init_list: tuple[str, ...] = ()
    model_slice: tuple[int, int] = (0, 0)
    annotations: tuple[tuple[str, int], ...] = ()
    related_populators: tuple = ()
    reorder: Callable | None = None
    needs_transaction: bool = False


class PreparedQuery:
    """``build()`` returns the queryset, with ``Param`` placeholders; compiled once."""

    def __init__(self, build: Callable[[], QuerySet], using: str = DEFAULT_DB_ALIAS) -> None:
        self._build = build
        self._compiled = _PerConnection(using)

    def all(self, **values: Any) -> list:
        connection = connections[self._compiled.using]
        compiled: _CompiledSelect = self._compiled.get(connection, self._compile)
        if compiled.needs_transaction and connection.get_autocommit():
            raise TransactionManagementError("select_for_update cannot be used outside of a transaction.")
        with connection.cursor() as cursor:
            cursor.execute(compiled.sql, compiled.values_for(values, connection))
            rows = cursor.fetchall()
        if compiled.converters:
            rows = [_converted(row, compiled.converters, connection) for row in rows]
        if compiled.shape == "flat":
            return [row[0] for row in rows]
        if compiled.shape == "tuples":
            return (
                [compiled.reorder(row) for row in rows] if compiled.reorder else [tuple(row) for row in rows]
            )
        return [self._instance(compiled, connection.alias, row) for row in rows]

    def raw_rows(self, **values: Any) -> list[tuple]:
        """The rows as the database driver returns them, without the ORM's
        conversions or reordering: only for queries whose columns need none on every
        backend (text ids, counts), when there are many rows (converting 10,000 rows
        in Python cost more than the query)."""
        connection = connections[self._compiled.using]
        compiled: _CompiledSelect = self._compiled.get(connection, self._compile)
        if compiled.shape != "tuples" or compiled.reorder is not None or compiled.needs_transaction:
            raise ValueError("raw_rows() is for values_list() queries in their own column order")
        with connection.cursor() as cursor:
            cursor.execute(compiled.sql, compiled.values_for(values, connection))
            return cursor.fetchall()

    def first(self, **values: Any) -> Any:
        """The first row, or ``None`` (build the queryset with ``[:1]``)."""
        rows = self.all(**values)
        return rows[0] if rows else None

    @staticmethod
    def _instance(compiled: _CompiledSelect, alias: str, row) -> Any:
        start, end = compiled.model_slice
        obj = compiled.model.from_db(alias, compiled.init_list, row[start:end])
        for populator in compiled.related_populators:
            populator.populate(row, obj)
        for name, position in compiled.annotations:
            setattr(obj, name, row[position])
        return obj

    def _compile(self, connection) -> _CompiledSelect:
        queryset = self._build()
        if queryset._prefetch_related_lookups:
            raise TypeError("PreparedQuery: prefetch_related is not supported")
        query = queryset.query
        compiler = query.get_compiler(connection=connection)
        sql, params = compiler.as_sql()
        fields = [s[0] for s in compiler.select[0 : compiler.col_count]]
        if compiler.has_composite_fields(fields):
            raise TypeError("PreparedQuery: composite fields are not supported")
        converters = tuple(
            (position, tuple(_unbound(convert, connection) for convert in convs), expression)
            for position, (convs, expression) in compiler.get_converters(fields).items()
        )
        base = _with_slots(sql, params, connection.vendor)
        common = dict(
            sql=base.sql,
            params=base.params,
            slots=base.slots,
            vendor=base.vendor,
            converters=converters,
            needs_transaction=bool(query.select_for_update and connection.features.has_select_for_update),
        )
        iterable = queryset._iterable_class
        if iterable is FlatValuesListIterable:
            return _CompiledSelect(**common, shape="flat")
        if iterable is ValuesListIterable:
            return _CompiledSelect(**common, shape="tuples", reorder=_values_list_order(queryset))
        if iterable is not ModelIterable:
            raise TypeError(f"PreparedQuery: {iterable.__name__} results are not supported")
        klass_info = compiler.klass_info
        select_fields = klass_info["select_fields"]
        start, end = select_fields[0], select_fields[-1] + 1
        return _CompiledSelect(
            **common,
            shape="model",
            model=klass_info["model"],
            init_list=tuple(f[0].target.attname for f in compiler.select[start:end]),
            model_slice=(start, end),
            annotations=tuple(compiler.annotation_col_map.items()),
            related_populators=tuple(get_related_populators(klass_info, compiler.select, queryset.db)),
        )


def _values_list_order(queryset: QuerySet) -> Callable | None:
    """The reordering ``ValuesListIterable`` does when annotations come last."""
    query = queryset.query
    if not queryset._fields:
        return None
    names = [*query.extra_select, *query.values_select, *query.annotation_select]
    fields = [*queryset._fields, *(f for f in query.annotation_select if f not in queryset._fields)]
    if fields == names:
        return None
    index_map = {name: index for index, name in enumerate(names)}
    getter = operator.itemgetter(*[index_map[f] for f in fields])
    return (lambda row: (getter(row),)) if len(fields) == 1 else getter


def _unbound(convert: Callable, connection) -> tuple[Callable, bool]:
    """A converter, and whether it is a method of the backend's operations: those are
    bound to the running connection's at each run. Kept bound to the connection that
    compiled the query, they would keep that connection (and its database file) open
    for the life of the process."""
    if getattr(convert, "__self__", None) is connection.ops:
        return convert.__func__, True
    return convert, False


def _converted(row, converters, connection) -> list:
    row = list(row)
    ops = connection.ops
    for position, convs, expression in converters:
        value = row[position]
        for converter, of_ops in convs:
            value = (
                converter(ops, value, expression, connection)
                if of_ops
                else converter(value, expression, connection)
            )
        row[position] = value
    return row


class PreparedUpdate:
    """``QuerySet.update`` compiled once: ``build()`` returns ``(queryset, values)``,
    both may hold ``Param`` placeholders. ``run(**values)`` returns the rows updated."""

    def __init__(
        self, build: Callable[[], tuple[QuerySet, dict[str, Any]]], using: str = DEFAULT_DB_ALIAS
    ) -> None:
        self._build = build
        self._compiled = _PerConnection(using)

    def run(self, **values: Any) -> int:
        connection = connections[self._compiled.using]
        compiled: _Compiled = self._compiled.get(connection, self._compile)
        # As QuerySet.update: a failed write inside an atomic block marks it for rollback.
        with transaction.mark_for_rollback_on_error(connection.alias), connection.cursor() as cursor:
            cursor.execute(compiled.sql, compiled.values_for(values, connection))
            return cursor.rowcount

    def _compile(self, connection) -> _Compiled:
        queryset, changes = self._build()
        query = queryset.query.chain(UpdateQuery)
        query.add_update_values(changes)
        if query.related_updates:
            raise TypeError("PreparedUpdate: updates of parent models are not supported")
        sql, params = query.get_compiler(connection=connection).as_sql()
        return _with_slots(sql, params, connection.vendor)


_saves: dict[tuple[type, tuple[str, ...]], PreparedUpdate] = {}


def save_fields(instance: Any, fields: list[str] | tuple[str, ...]) -> None:
    """``instance.save(update_fields=fields)`` without building the UPDATE each time
    (no ``pre_save``/``post_save`` signals: only for models nothing listens to, and
    fields with no ``auto_now``). Raises ``DatabaseError`` when no row was updated,
    as ``save(update_fields=...)`` does."""
    model = type(instance)
    key = (model, tuple(fields))
    update = _saves.get(key)
    if update is None:
        meta = model._meta
        changes = {name: Param(name, meta.get_field(name)) for name in fields}
        update = _saves.setdefault(
            key, PreparedUpdate(lambda: (model._default_manager.filter(pk=Param("pk", meta.pk)), changes))
        )
    values = {name: getattr(instance, instance._meta.get_field(name).attname) for name in fields}
    if not update.run(pk=instance.pk, **values):
        raise DatabaseError("Save with update_fields did not affect any rows.")


class PreparedInsert:
    """``Model.objects.create()`` of one row, with the INSERT built once per model.

    Every concrete field is written (defaults were filled in when the instance was
    made). Only for models whose rows get no value from the database (no auto
    primary key, no ``db_default`` or generated fields) and nothing listens to their
    ``pre_save``/``post_save`` signals."""

    def __init__(self, model: type, using: str = DEFAULT_DB_ALIAS) -> None:
        meta = model._meta
        if meta.db_returning_fields:
            raise TypeError(f"PreparedInsert: {meta.label} gets values from the database")
        self.model = model
        self.fields = tuple(meta.local_concrete_fields)
        self._compiled = _PerConnection(using)

    def save(self, instance: Any) -> None:
        connection = connections[self._compiled.using]
        compiled: _Compiled = self._compiled.get(connection, self._compile)
        values = {field.attname: field.pre_save(instance, True) for field in self.fields}
        with transaction.mark_for_rollback_on_error(connection.alias), connection.cursor() as cursor:
            cursor.execute(compiled.sql, compiled.values_for(values, connection))
        instance._state.adding = False
        instance._state.db = connection.alias

    def _compile(self, connection) -> _Compiled:
        template = self.model()
        for field in self.fields:
            setattr(template, field.attname, Param(field.attname, field))
        query = InsertQuery(self.model)
        query.insert_values(self.fields, [template])
        [(sql, params)] = query.get_compiler(connection=connection).as_sql()
        return _with_slots(sql, params, connection.vendor)


_inserts: dict[type, PreparedInsert] = {}


def insert(instance: Any) -> Any:
    """Write a new ``instance`` (as ``instance.save(force_insert=True)``); returns it."""
    model = type(instance)
    prepared = _inserts.get(model) or _inserts.setdefault(model, PreparedInsert(model))
    prepared.save(instance)
    return instance
