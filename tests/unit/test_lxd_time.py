"""lxcspawner.lxd.parse_time: LXD's RFC 3339 times, read by keyportal (the
snapshots of a system and its home paired by time) and by the prebuilt
containers' keeper (when a container last started)."""

from __future__ import annotations

import datetime as dt

import pytest

from lxcspawner.lxd import parse_time

UTC = dt.timezone.utc


@pytest.mark.parametrize("stamp, expected", [
    ("2026-12-05T17:11:33.494674141Z", dt.datetime(2026, 12, 5, 17, 11, 33, 494674, UTC)),
    ("2026-12-05T17:11:33Z", dt.datetime(2026, 12, 5, 17, 11, 33, tzinfo=UTC)),
    ("2026-12-05T18:11:33.5+01:00", dt.datetime(2026, 12, 5, 17, 11, 33, 500000, UTC)),
    ("0001-01-01T00:00:00Z", dt.datetime(1, 1, 1, tzinfo=UTC)),   # never used
])
def test_lxds_times_are_read_with_their_zone(stamp, expected):
    assert parse_time(stamp) == expected


@pytest.mark.parametrize("stamp", ["", "yesterday", "2026-12-05"])
def test_what_is_not_a_time_is_a_value_error(stamp):
    with pytest.raises(ValueError):
        parse_time(stamp)
