"""A run's table with its key columns in front, as the Arrow table ``pyarrow.Table.from_pandas`` makes of it.

:func:`sim.lab.runs.finish_run` writes every table of a run with constant key columns (``run_id``, ``seed``,
``kl.beta`` …) in front. Through pandas that is a frame of the keys, a concatenation and a conversion of every
column to Arrow — most of the cost of writing a run folder. :func:`keyed_table` builds the same Arrow table
straight from the frame's NumPy columns: the first table of a layout (column names and dtypes, and the keys'
Python types) goes through pandas, and its schema (Arrow types and the ``pandas`` metadata that
``pandas.read_parquet`` restores the dtypes from) is kept for every later table of that layout. An empty table
(e.g. ``trajectories`` when none are logged) depends on its column names and dtypes alone, not on the keys'
values: the first one of a layout is kept whole and reused. Tables with columns or keys of other kinds (strings
in the table, ``None`` or lists as keys, …) always go through pandas.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa

#: dtype kinds of table columns copied straight from NumPy: bool, signed and unsigned integers, floats.
_FAST_KINDS = frozenset("biuf")
_INT64 = (-(2**63), 2**63)

#: The schema of each layout seen (see :func:`_layout`); filled by the first table of the layout.
_SCHEMAS: dict[tuple, pa.Schema] = {}
#: The empty table of each layout seen (key names, columns and dtypes; see :func:`_empty_layout`).
_EMPTY: dict[tuple, pa.Table] = {}
#: Constant string key columns already made, by (Arrow type, value, rows): most keys repeat across a task's runs.
_STRING_COLUMNS: dict[tuple, pa.Array] = {}
_STRING_COLUMNS_MAX = 256


def _cell_kind(value: Any) -> str | None:
    """How pandas stores a constant key column of ``value``, when the fast path knows it; else ``None``."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int" if _INT64[0] <= value < _INT64[1] else None
    if type(value) is float:
        return "float"
    if type(value) is str:
        return "str"
    return None


def _layout(df: pd.DataFrame, names: list, front: dict[str, Any]) -> tuple | None:
    """The key under which ``df`` (columns ``names``) with the key columns ``front`` shares a schema with other
    tables, or ``None`` when a column or key is of a kind that goes through pandas."""
    kinds = []
    for name, value in front.items():
        kind = _cell_kind(value)
        if kind is None:
            return None
        kinds.append((name, kind))
    cols = _columns_layout(df, names)
    return None if cols is None else (tuple(kinds), cols, str(df.columns.dtype))


def _empty_layout(df: pd.DataFrame, names: list, front: dict[str, Any]) -> tuple | None:
    """The key of an empty ``df`` with the key columns ``front``: their names, the columns and dtypes (the keys'
    values make no cell), or ``None`` when a column is of a kind that goes through pandas."""
    cols = _columns_layout(df, names)
    return None if cols is None else (tuple(front), cols, str(df.columns.dtype))


def _columns_layout(df: pd.DataFrame, names: list) -> tuple | None:
    """``((name, dtype), …)`` of ``df``'s columns, or ``None`` unless every column is a uniquely named NumPy
    column of a kind in :data:`_FAST_KINDS`."""
    import numpy as np

    cols = []
    for name, dtype in zip(names, df.dtypes.tolist(), strict=True):
        if type(name) is not str or not isinstance(dtype, np.dtype) or dtype.kind not in _FAST_KINDS \
                or not dtype.isnative:
            return None
        cols.append((name, dtype.str))
    if len(set(names)) != len(cols):
        return None
    return tuple(cols)


def _through_pandas(df: pd.DataFrame, front: dict[str, Any]) -> pa.Table:
    """The table as :func:`sim.lab.runs.finish_run` always made it: the keys' frame, concatenated, converted."""
    import pandas as pd
    import pyarrow as pa

    if front:
        keys = pd.DataFrame({k: [v] * len(df) for k, v in front.items()}, index=df.index)
        df = pd.concat([keys, df], axis=1)
    return pa.Table.from_pandas(df, preserve_index=False)


def keyed_table(df: pd.DataFrame, cells: dict[str, Any]) -> pa.Table:
    """``df`` with a constant column per key of ``cells`` that ``df`` lacks in front, as the Arrow table (with
    its ``pandas`` schema metadata) that ``pyarrow.Table.from_pandas(..., preserve_index=False)`` makes of it."""
    import numpy as np
    import pyarrow as pa

    names = df.columns.tolist()
    present = set(names)
    front = {k: v for k, v in cells.items() if k not in present}
    n = len(df)
    if not n:
        empty = _empty_layout(df, names, front)
        table = _EMPTY.get(empty) if empty is not None else None
        if table is None:
            table = _through_pandas(df, front)
            if empty is not None:
                _EMPTY[empty] = table
        return table
    layout = _layout(df, names, front)
    schema = _SCHEMAS.get(layout) if layout is not None else None
    if schema is None:
        table = _through_pandas(df, front)
        if layout is not None and _matches(table.schema, layout):
            _SCHEMAS[layout] = table.schema
        return table
    arrays = []
    for i, value in enumerate(front.values()):
        kind = layout[0][i][1]
        typ = schema.field(i).type
        if kind == "str":
            arrays.append(_string_column(value, n, typ))
        else:
            arrays.append(pa.array(np.full(n, value, dtype={"bool": bool, "int": np.int64, "float": np.float64}[kind]),
                                   type=typ))
    for j, column in enumerate(_numpy_columns(df)):
        arrays.append(pa.array(column, type=schema.field(len(front) + j).type, from_pandas=True))
    return pa.Table.from_arrays(arrays, schema=schema)


def _string_column(value: str, n: int, typ: pa.DataType) -> pa.Array:
    """``value`` ``n`` times as an Arrow array of ``typ`` (immutable: kept and shared while few are kept)."""
    import pyarrow as pa

    key = (str(typ), value, n)
    column = _STRING_COLUMNS.get(key)
    if column is None:
        column = pa.array([value] * n, type=typ)
        if len(_STRING_COLUMNS) >= _STRING_COLUMNS_MAX:
            _STRING_COLUMNS.clear()
        _STRING_COLUMNS[key] = column
    return column


def _numpy_columns(df: pd.DataFrame) -> list:
    """The NumPy arrays of ``df``'s columns, in order: read off its blocks where pandas allows (a column's
    ``Series`` costs more than its conversion to Arrow), else column by column."""
    get = getattr(df, "_get_column_array", None)
    if get is None:
        return [column.to_numpy() for _, column in df.items()]
    return [get(j) for j in range(df.shape[1])]


def _matches(schema: pa.Schema, layout: tuple) -> bool:
    """Whether the table pandas made has the layout's columns, in order, with the types the fast path makes."""
    import pyarrow as pa

    kinds, cols, _ = layout
    expect_names = [k for k, _ in kinds] + [c for c, _ in cols]
    if schema.names != expect_names:
        return False
    checks = {"bool": pa.types.is_boolean, "int": lambda t: t == pa.int64(), "float": lambda t: t == pa.float64(),
              "str": lambda t: pa.types.is_string(t) or pa.types.is_large_string(t)}
    return all(checks[kind](schema.field(i).type) for i, (_, kind) in enumerate(kinds))
