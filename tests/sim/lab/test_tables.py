"""A run's table with its key columns, built straight in Arrow, is the table pandas makes: same schema, same
pandas metadata, same values (NaN as null), for every layout, on the first table of a layout and the next ones."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from sim.lab import tables
from sim.lab.tables import keyed_table


def _frame(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    x[::3] = np.nan
    return pd.DataFrame({"update": np.arange(n, dtype=np.int64), "reward": x,
                         "logp": rng.normal(size=n).astype(np.float32), "alive": rng.random(n) > 0.5,
                         "count": rng.integers(0, 9, n).astype(np.uint8)})


def _reference(df: pd.DataFrame, cells: dict) -> pa.Table:
    front = pd.DataFrame({k: [v] * len(df) for k, v in cells.items() if k not in df.columns}, index=df.index)
    return pa.Table.from_pandas(pd.concat([front, df], axis=1), preserve_index=False)


CELLS = [
    {"run_id": "a1b2", "seed": 3, "kl.beta": 0.25, "env.id": "bandit", "kl.placement": "loss", "flag": True},
    {"run_id": "c3d4", "seed": 2**40, "kl.beta": 1.0, "update": 7},  # a key the table already has is not repeated
    {},
    {"run_id": "e5f6", "seed": None, "axis": "[1, 2]"},  # None: through pandas
    {"run_id": "g7h8", "kl.beta": np.float64(0.5)},  # a NumPy scalar: through pandas
]


@pytest.mark.parametrize("cells", CELLS)
def test_keyed_table_is_the_table_pandas_makes(cells, monkeypatch):
    monkeypatch.setattr(tables, "_SCHEMAS", {})
    for seed, n in enumerate([5, 17, 0, 1]):  # the first table of the layout, then cached ones (and an empty one)
        df = _frame(n, seed)
        got, want = keyed_table(df, cells), _reference(df, cells)
        assert got.schema.equals(want.schema, check_metadata=True)
        assert got.equals(want)
        back = got.to_pandas()
        ref = want.to_pandas()
        assert back.equals(ref) and (back.dtypes == ref.dtypes).all()


def test_tables_with_other_columns_go_through_pandas(monkeypatch):
    monkeypatch.setattr(tables, "_SCHEMAS", {})
    df = pd.DataFrame({"update": [0, 1], "name": ["a", "b"], "x": pd.array([1, None], dtype="Int64")})
    cells = {"run_id": "r", "seed": 0}
    for _ in range(2):
        got, want = keyed_table(df, cells), _reference(df, cells)
        assert got.equals(want) and got.schema.equals(want.schema, check_metadata=True)
    assert tables._SCHEMAS == {}


@pytest.mark.parametrize("cells", CELLS)
def test_empty_tables_are_made_once_per_layout(cells, monkeypatch):
    """An empty table's cells do not depend on the keys' values: the first one of a layout is reused, and it is
    the table pandas makes for any values of the same keys."""
    monkeypatch.setattr(tables, "_EMPTY", {})
    calls = []
    through = tables._through_pandas
    monkeypatch.setattr(tables, "_through_pandas", lambda df, front: calls.append(1) or through(df, front))
    other = {k: (f"{v}x" if isinstance(v, str) else None) for k, v in cells.items()}  # other values, other kinds
    for seed, keys in enumerate([cells, other, cells]):
        df = _frame(0, seed)
        got, want = keyed_table(df, keys), _reference(df, keys)
        assert got.schema.equals(want.schema, check_metadata=True)
        assert got.equals(want)
    assert len(calls) == 1


def test_string_key_columns_are_shared_and_bounded(monkeypatch):
    monkeypatch.setattr(tables, "_SCHEMAS", {})
    monkeypatch.setattr(tables, "_STRING_COLUMNS", {})
    monkeypatch.setattr(tables, "_STRING_COLUMNS_MAX", 3)
    for i in range(6):
        cells = {"run_id": f"r{i}", "env.id": "bandit"}
        df = _frame(4, i)
        assert keyed_table(df, cells).equals(_reference(df, cells))
        assert len(tables._STRING_COLUMNS) <= 3
