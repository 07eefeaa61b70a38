"""Log lines: each request has an id (the client's when it is plain, else a new one), answered in
X-Request-Id and stamped on the lines written while serving it; JSON lines parse."""

import json
import logging

import pytest

from broker.logs import JsonFormatter, RequestIdFilter, request_id_from


@pytest.mark.parametrize("header", [None, "", "short", "x" * 65, "a b c d e f g h", "id\nforged"])
def test_an_unusable_request_id_is_replaced_by_a_new_one(header):
    made = request_id_from(header)
    assert made != header and len(made) == 32 and made.isalnum()


def test_a_plain_request_id_is_kept_and_answered(make_app, caplog):
    app = make_app()
    client = app.test_client()
    kept = client.get("/healthz", headers={"X-Request-Id": "lb-7f3a9c21"})
    fresh = client.get("/healthz", headers={"X-Request-Id": '"><script>'})
    assert kept.headers["X-Request-Id"] == "lb-7f3a9c21"
    assert (
        fresh.headers["X-Request-Id"] != '"><script>' and len(fresh.headers["X-Request-Id"]) == 32
    )


def test_a_json_line_carries_the_message_level_and_request_id():
    record = logging.LogRecord("broker.x", logging.WARNING, __file__, 1, "hello %s", ("you",), None)
    RequestIdFilter().filter(record)  # outside a request: "-"
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "hello you" and line["level"] == "warning"
    assert line["request_id"] == "-" and line["logger"] == "broker.x"
