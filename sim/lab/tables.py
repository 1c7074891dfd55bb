"""A run's table with its key columns in front, as the Arrow table ``pyarrow.Table.from_pandas`` makes of it.

:func:`sim.lab.runs.finish_run` writes every table of a run with constant key columns (``run_id``, ``seed``,
``kl.beta`` …) in front. Through pandas that is a frame of the keys, a concatenation and a conversion of every
column to Arrow — most of the cost of writing a run folder. :func:`keyed_table` builds the same Arrow table
straight from the frame's NumPy columns: the first table of a layout (column names and dtypes, and the keys'
Python types) goes through pandas, and its schema (Arrow types and the ``pandas`` metadata that
``pandas.read_parquet`` restores the dtypes from) is kept for every later table of that layout. Tables with
columns or keys of other kinds (strings in the table, ``None`` or lists as keys, …) always go through pandas.
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
    import numpy as np

    cols = []
    for name, dtype in zip(names, df.dtypes.tolist(), strict=True):
        if type(name) is not str or not isinstance(dtype, np.dtype) or dtype.kind not in _FAST_KINDS \
                or not dtype.isnative:
            return None
        cols.append((name, dtype.str))
    if len(set(names)) != len(cols):
        return None
    return tuple(kinds), tuple(cols), str(df.columns.dtype)


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
    layout = _layout(df, names, front)
    n = len(df)
    schema = _SCHEMAS.get(layout) if layout is not None and n else None
    if schema is None:
        table = _through_pandas(df, front)
        if layout is not None and n and _matches(table.schema, layout):
            _SCHEMAS[layout] = table.schema
        return table
    arrays = []
    for i, value in enumerate(front.values()):
        kind = layout[0][i][1]
        typ = schema.field(i).type
        if kind == "str":
            arrays.append(pa.array([value] * n, type=typ))
        else:
            arrays.append(pa.array(np.full(n, value, dtype={"bool": bool, "int": np.int64, "float": np.float64}[kind]),
                                   type=typ))
    for j, (_, column) in enumerate(df.items()):
        arrays.append(pa.array(column.to_numpy(), type=schema.field(len(front) + j).type, from_pandas=True))
    return pa.Table.from_arrays(arrays, schema=schema)


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
