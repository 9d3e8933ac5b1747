"""Whether two data folders hold the same results: every checkpoint byte for byte, every Parquet
table column by column except wall times and provenance (stamps, device, revision). For a change
that must not change results: run the same pipeline with the old and the new binaries into two
data folders (`cargo xtask run-all --config A.toml --bin-dir OLD/target/release`, the same with
B.toml and NEW), then

  python3 bench/compare_outputs.py OLD_DATA NEW_DATA

Prints each difference, then "N checkpoints, M tables, K differing; digest D" (D hashes what was
compared, so that two people can tell they compared the same results). Exits 1 on a difference.
Needs pyarrow.
"""

import hashlib
import os
import sys

import pyarrow.parquet as pq

# Columns that may differ between two runs of the same computation.
NOT_COMPARED = {"seconds", "train_seconds", "wall_seconds", "eval_seconds", "device", "revision", "stamp",
                "host", "created"}


def main():
    a, b = sys.argv[1], sys.argv[2]
    checkpoints = tables = differing = 0
    digest = hashlib.sha256()
    for root, _, files in os.walk(a):
        for f in sorted(files):
            path_a = os.path.join(root, f)
            rel = os.path.relpath(path_a, a)
            path_b = os.path.join(b, rel)
            if rel.startswith(("logs", "datasets", "bench")):
                continue
            if not f.endswith((".safetensors", ".parquet")):
                continue
            if not os.path.exists(path_b):
                print("missing", rel)
                differing += 1
                continue
            if f.endswith(".safetensors"):
                x, y = open(path_a, "rb").read(), open(path_b, "rb").read()
                checkpoints += 1
                digest.update(rel.encode())
                digest.update(x)
                if x != y:
                    print("differs", rel)
                    differing += 1
                continue
            ta, tb = pq.read_table(path_a), pq.read_table(path_b)
            kept = lambda t: [c for c in t.column_names if c not in NOT_COMPARED and not c.endswith("_seconds")]
            tables += 1
            if kept(ta) != kept(tb):
                print("columns differ", rel, sorted(set(kept(ta)) ^ set(kept(tb))))
                differing += 1
                continue
            for c in kept(ta):
                va, vb = ta.column(c).to_pylist(), tb.column(c).to_pylist()
                digest.update(rel.encode())
                digest.update(c.encode())
                digest.update(repr(va).encode())
                if va != vb:
                    print("differs", rel, c)
                    differing += 1
    print(f"{checkpoints} checkpoints, {tables} tables, {differing} differing; digest {digest.hexdigest()[:16]}")
    sys.exit(1 if differing else 0)


if __name__ == "__main__":
    main()
