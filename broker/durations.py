"""Parse the durations people type (`90`, `45s`, `30m`, `2h`, `1h30m`) into whole seconds."""

import re

# ASCII digits only: `\d` and int() also take Arabic-Indic, full-width and other digits, which
# nobody documents and which look like other numbers to the person reading the audit log.
_PART = re.compile(r"([0-9]+)([hms])")
_SECONDS = re.compile(r"[0-9]+")
_UNIT_SECONDS = {"h": 3600, "m": 60, "s": 1}
# Far beyond any elevation window, far below what a datetime can add without overflowing: a
# larger number is a mistake or an attack, refused here as unreadable rather than failing later.
MAX_SECONDS = 366 * 24 * 3600
_UNREADABLE = "a duration is a number of seconds or text like 30m, 2h, 1h30m"


def parse_duration(value: object) -> int:
    """Return the duration in seconds; raise ValueError with a readable message otherwise."""
    if isinstance(value, bool):
        raise ValueError(_UNREADABLE)
    if isinstance(value, int):
        seconds = value
    elif isinstance(value, str) and not value.isascii():
        raise ValueError(f"{_UNREADABLE} (ASCII digits and h, m, s only)")
    elif isinstance(value, str) and _SECONDS.fullmatch(value.strip()):
        seconds = _whole(value.strip())
    elif isinstance(value, str):
        text = value.strip().lower()
        parts = _PART.findall(text)
        if not parts or "".join(n + u for n, u in parts) != text:
            raise ValueError(
                f"cannot read duration {value!r}: use seconds or text like 30m, 2h, 1h30m"
            )
        units = [u for _, u in parts]
        if len(set(units)) != len(units) or units != sorted(units, key="hms".index):
            raise ValueError(
                f"cannot read duration {value!r}: give hours, minutes, seconds in order"
            )
        seconds = sum(_whole(n) * _UNIT_SECONDS[u] for n, u in parts)
    else:
        raise ValueError(_UNREADABLE)
    if seconds <= 0:
        raise ValueError("a duration must be longer than zero")
    if seconds > MAX_SECONDS:
        raise ValueError(f"a duration must be at most {format_duration(MAX_SECONDS)}")
    return seconds


def _whole(digits: str) -> int:
    """int() of ASCII digits; a number with more digits than any allowed duration is refused
    before converting it (int() of thousands of digits is slow, then refused by Python)."""
    if len(digits.lstrip("0")) > len(str(MAX_SECONDS)):
        raise ValueError(f"a duration must be at most {format_duration(MAX_SECONDS)}")
    return int(digits)


def format_duration(seconds: int) -> str:
    """The inverse of parse_duration, for messages: 5400 -> '1h30m'."""
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    text = (f"{hours}h" if hours else "") + (f"{minutes}m" if minutes else "")
    return text + (f"{secs}s" if secs or not text else "")
