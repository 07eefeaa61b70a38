import pytest

from broker.durations import format_duration, parse_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        (90, 90),
        ("90", 90),
        ("45s", 45),
        ("30m", 1800),
        ("2h", 7200),
        ("1h30m", 5400),
        ("1h0m5s", 3605),
        (" 2H ", 7200),
    ],
)
def test_parse_accepts_seconds_and_units(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text",
    ["", "0", 0, -5, "-5m", "abc", "5d", "30m1h", "1h1h", "1.5h", "m30", None, True, 2.5, "0h0m"],
)
def test_parse_refuses_zero_negative_and_unreadable(text):
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize("seconds", [1, 59, 60, 3600, 5400, 3661])
def test_format_round_trips(seconds):
    assert parse_duration(format_duration(seconds)) == seconds
