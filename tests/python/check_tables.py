#!/usr/bin/env python3
"""Checks that every layerlab table under a data folder opens in pandas and DuckDB unchanged.

Usage: python3 tests/python/check_tables.py DATA_DIR

For every ``*.parquet`` under DATA_DIR the script reads the file with ``pandas.read_parquet`` and
with DuckDB (``SELECT * FROM 'file'``), checks the documented columns and their types for the
table's kind (known by file name: history, units, movement, results, summary, robustness, sweep), and
checks that DuckDB sees the provenance key ``config_hash`` in the file's key-value metadata. It
prints one line per table and a final ``N passed, M failed`` line, and exits non-zero when any
table fails (or when there is no table at all).
"""

import sys
from pathlib import Path

import duckdb
import pandas as pd

# DuckDB type names of the plain Parquet types layerlab writes.
I, F, T, B = "BIGINT", "DOUBLE", "VARCHAR", "BOOLEAN"

# The documented columns of each table kind, in order, with their types.
SCHEMAS = {
    "history": [
        ("experiment", T), ("seed", I), ("epoch", I), ("step", I), ("lr", F), ("train_loss", F),
        ("train_error", F), ("test_loss", F), ("test_error", F), ("train_seconds", F), ("seconds", F),
    ],
    "units": [
        ("experiment", T), ("seed", I), ("unit_index", I), ("unit", T), ("kind", T), ("tensors", T),
        ("params", I),
    ],
    "movement": [
        ("experiment", T), ("seed", I), ("unit_index", I), ("unit", T), ("epoch", I), ("l2_to_init", F),
        ("l2_to_init_rel", F), ("linf_to_init", F), ("l2_to_final", F), ("l2_norm", F),
    ],
    "results": [
        ("experiment", T), ("dataset", T), ("arch", T), ("seed", I), ("mode", T), ("unit", T),
        ("unit_index", I), ("units", T), ("source_epoch", I), ("draw", I), ("bn_stats", T),
        ("test_error", F), ("test_loss", F), ("train_error", F), ("train_loss", F),
    ],
    "summary": [
        ("experiment", T), ("dataset", T), ("arch", T), ("unit", T), ("unit_index", I), ("units", T),
        ("mode", T), ("bn_stats", T), ("source_epoch", I), ("n_seeds", I), ("n_rows", I),
        ("test_error_mean", F), ("test_error_std", F), ("test_error_ci95_low", F),
        ("test_error_ci95_high", F), ("baseline_test_error", F), ("test_error_delta", F),
        ("train_error_mean", F), ("train_error_std", F), ("train_error_ci95_low", F),
        ("train_error_ci95_high", F), ("baseline_train_error", F), ("train_error_delta", F),
    ],
    "robustness": [
        ("experiment", T), ("dataset", T), ("arch", T), ("unit", T), ("unit_index", I), ("bn_stats", T),
        ("n_seeds", I), ("baseline_test_error", F), ("tolerance", F), ("chance_error", F),
        ("reinit_epoch", I), ("reinit_test_error", F), ("reinit_delta", F), ("reinit_damage", F),
        ("reinit_class", T), ("rerandomize_test_error", F), ("rerandomize_delta", F),
        ("rerandomize_damage", F), ("rerandomize_class", T), ("l2_to_init_rel_final", F), ("params", I),
    ],
}

# sweep.parquet: `sweep`, `point`, one column per axis (named by its dotted setting, so its columns
# depend on the sweep), then every summary column, then `tolerance` and `class`.
SWEEP_HEAD = [("sweep", T), ("point", T)]
SWEEP_TAIL = SCHEMAS["summary"] + [("tolerance", F), ("class", T)]

# pandas dtypes acceptable for each Parquet type: an Int64 column holding nulls comes back as
# float64, and text as object (or pandas' string dtype, depending on the pandas version).
PANDAS_KINDS = {I: "iuf", F: "f", T: "OSU", B: "bO"}


def quote(path: Path) -> str:
    return "'" + str(path).replace("'", "''") + "'"


def check(path: Path) -> str:
    """Checks one table; returns a short description, raises AssertionError on a fault."""
    kind = path.stem
    frame = pd.read_parquet(path)
    con = duckdb.connect()
    try:
        rows = con.execute(f"SELECT count(*) FROM {quote(path)}").fetchone()[0]
        con.execute(f"SELECT * FROM {quote(path)}").fetchall()
        described = con.execute(f"DESCRIBE SELECT * FROM {quote(path)}").fetchall()
        keys = [
            bytes(k).decode() if isinstance(k, (bytes, bytearray)) else str(k)
            for (k,) in con.execute(f"SELECT key FROM parquet_kv_metadata({quote(path)})").fetchall()
        ]
    finally:
        con.close()
    assert len(frame) == rows, f"pandas reads {len(frame)} rows, DuckDB {rows}"
    assert "config_hash" in keys, f"no 'config_hash' in the key-value metadata (keys: {', '.join(keys) or 'none'})"
    duck_types = {name: typ for name, typ, *_ in described}
    schema = SCHEMAS.get(kind)
    if kind == "sweep":
        axes = [(name, typ) for name, typ, *_ in described][len(SWEEP_HEAD) : len(described) - len(SWEEP_TAIL)]
        assert axes, "no axis column between `point` and the summary columns"
        for name, typ in axes:
            assert name == "dataset" or "." in name, f"axis column '{name}' is not a dotted setting"
            assert typ in (I, F, T, B), f"axis column '{name}' is {typ}"
        # What the guide promises: grouping by an axis works as it is.
        con = duckdb.connect()
        try:
            axis = axes[0][0].replace('"', '""')
            groups = con.execute(f'SELECT "{axis}", count(*) FROM {quote(path)} GROUP BY "{axis}"').fetchall()
        finally:
            con.close()
        assert groups, f'GROUP BY "{axis}" gives no group'
        schema = SWEEP_HEAD + axes + SWEEP_TAIL
    if schema is None:
        return f"{rows} rows (kind '{kind}' has no documented schema: columns not checked)"
    want = [name for name, _ in schema]
    missing = [c for c in want if c not in duck_types]
    extra = [c for c in duck_types if c not in want]
    assert not missing, f"missing column(s): {', '.join(missing)}"
    assert not extra, f"undocumented column(s): {', '.join(extra)}"
    for name, typ in schema:
        assert duck_types[name] == typ, f"column '{name}' is {duck_types[name]} in DuckDB, expected {typ}"
        dtype = frame[name].dtype
        assert dtype.kind in PANDAS_KINDS[typ], f"column '{name}' is {dtype} in pandas, expected a {typ} column"
    assert list(frame.columns) == want, f"columns in another order: {', '.join(frame.columns)}"
    return f"{rows} rows, {len(want)} columns as documented"


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    root = Path(argv[1])
    if not root.is_dir():
        print(f"error: {root} is not a folder", file=sys.stderr)
        return 2
    tables = sorted(p for p in root.rglob("*.parquet") if not p.name.startswith("."))
    if not tables:
        print(f"error: no *.parquet under {root}", file=sys.stderr)
        return 1
    passed = failed = 0
    for path in tables:
        try:
            what = check(path)
        except Exception as e:  # Every fault, expected or not, is reported against its file.
            failed += 1
            print(f"FAIL {path}: {e}")
        else:
            passed += 1
            print(f"ok   {path}: {what}")
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
