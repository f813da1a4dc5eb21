"""Reading a user's files: the CSV separator found as a spreadsheet wrote it."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from distill.tasks.compress import readers


@pytest.mark.parametrize("sep", [",", ";", "\t", "|"])
def test_every_common_separator_reads_the_same_table(tmp_path, sep):
    frame = pd.DataFrame({"a": [1.5, 2.5, 3.5], "b": ["x, y", "z", "w"], "label": [0, 1, 0]})
    path = tmp_path / "t.csv"
    frame.to_csv(path, sep=sep, index=False)
    assert readers.csv_separator(path) == sep
    assert readers.read_header(path, "csv", "f") == ["a", "b", "label"]
    read = readers.read_frame(path, "csv", "f")
    pd.testing.assert_frame_equal(read, frame)
    chunks = list(readers.read_frames(path, "csv", "f", ["a", "b"], ["b"], chunk_rows=2))
    assert [len(c) for c in chunks] == [2, 1]
    np.testing.assert_array_equal(pd.concat(chunks)["a"], frame["a"])


def test_a_comma_inside_quotes_does_not_make_a_separator(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text('a;note\n1;"x, y"\n2;"z, w"\n')
    assert readers.csv_separator(path) == ";"


def test_a_one_column_file_reads_with_commas(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("a\n1\n2\n")
    assert readers.csv_separator(path) == ","


def test_parquet_rows_come_back_in_the_order_asked_across_batches(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"a": rng.normal(size=300), "b": rng.choice(["x", "y"], 300)})
    path = tmp_path / "t.parquet"
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), path, row_group_size=70)
    positions = rng.permutation(300)[:120]  # unsorted, spread over every batch of 32 rows
    got = readers.parquet_rows(path, positions, ["b", "a"], batch_rows=32)
    pd.testing.assert_frame_equal(got, frame.iloc[positions][["b", "a"]].reset_index(drop=True))
