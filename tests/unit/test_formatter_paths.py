"""The formatters' fast paths (a batch in time order, a column of one value) give what the
general paths give."""

from __future__ import annotations

import datetime

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.batch import Coded, Fixed
from pipeline.derive import formatters as fmt


def _texts(out: Fixed | list[bytes]) -> list[bytes]:
    return out.values() if isinstance(out, Fixed) else out


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1_600_000_000 * 10**9, 1_900_000_000 * 10**9), min_size=1,
                max_size=300), st.randoms())
def test_timestamps_of_a_shuffled_batch_are_the_shuffled_timestamps(
        ns: list[int], rnd: object) -> None:
    ordered = sorted(ns)
    shuffled = list(ordered)
    rnd.shuffle(shuffled)  # type: ignore[attr-defined]
    by_value = dict(zip(ordered, _texts(fmt.timestamps(np.array(ordered, dtype=np.uint64))),
                        strict=True))
    assert _texts(fmt.timestamps(np.array(shuffled, dtype=np.uint64))) == [
        by_value[v] for v in shuffled]


def test_a_timestamp_has_nine_fraction_digits_and_the_local_offset() -> None:
    ns = 1_764_000_000 * 10**9 + 7_004_005  # .007004005
    text = _texts(fmt.timestamps(np.array([ns], dtype=np.uint64)))[0].decode()
    local = datetime.datetime.fromtimestamp(ns // 10**9).astimezone()
    assert text.startswith(local.strftime("%Y-%m-%dT%H:%M:%S") + ".007004005")


@given(st.lists(st.integers(0, 5), min_size=1, max_size=200))
def test_by_unique_maps_every_record_to_its_own_text(values: list[int]) -> None:
    out = fmt.by_unique(np.array(values, dtype=np.int64), lambda v: b"v%d" % v)
    assert isinstance(out, Coded)
    assert out.values() == [b"v%d" % v for v in values]
    assert len(out.table) == len(set(values))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 2_100_000_000 * 10**9), min_size=1, max_size=fmt._FEW))
def test_few_timestamps_read_as_the_batch_path_writes_them(ns: list[int]) -> None:
    few = _texts(fmt.timestamps(np.array(ns, dtype=np.uint64)))
    # The batch path, asked directly: the same values repeated past the small size.
    reps = fmt._FEW // len(ns) + 1
    many = _texts(fmt.timestamps(np.array(ns * reps, dtype=np.uint64)))
    assert few == many[: len(ns)]
