import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.durations import MAX_SECONDS, format_duration, parse_duration


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


@pytest.mark.parametrize(
    "text",
    [
        "\u0665",  # Arabic-Indic 5: int() and \\d take it
        "\u0665m",
        "\uff13\uff10m",  # full-width 30
        "1h\u0663\u0660m",
        "\u2009" + "30m",  # a thin space, which str.strip() would remove
        "\U0001d7d9h",
    ],
)
def test_parse_takes_ascii_digits_only(text):
    with pytest.raises(ValueError, match="ASCII"):
        parse_duration(text)


@pytest.mark.parametrize(
    "value", [MAX_SECONDS + 1, 10**400, "9" * 5000, "100000000000000000000000s", "9999999h"]
)
def test_parse_refuses_durations_no_window_needs(value):
    """An enormous duration overflowed the window arithmetic later (a 500 on extend)."""
    with pytest.raises(ValueError, match="at most"):
        parse_duration(value)


@given(st.integers(min_value=1, max_value=MAX_SECONDS))
def test_every_allowed_duration_round_trips(seconds):
    assert parse_duration(format_duration(seconds)) == seconds
    assert parse_duration(str(seconds)) == seconds
