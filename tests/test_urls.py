"""broker/urls.py: the one check of the URLs the broker sends to, shared by the settings, the
notifier and the audit forwarder; it never echoes the URL."""

import pytest

from broker.errors import ConfigError
from broker.urls import loggable_target


@pytest.mark.parametrize(
    ("url", "target"),
    [
        ("https://hooks.slack.com/services/T0/B0/s3cr3t", "https://hooks.slack.com"),
        ("http://siem.example:8088/ingest?key=s3cr3t", "http://siem.example:8088"),
    ],
)
def test_only_scheme_host_and_port_may_be_logged(url, target):
    assert loggable_target(url, "notify.webhook_url") == target


@pytest.mark.parametrize(
    "url",
    [
        "hooks.slack.com/s3cr3t",
        "ftp://example.com/s3cr3t",
        "http://h:port/s3cr3t",
        "https:///s3cr3t",
    ],
)
def test_a_url_that_is_not_http_with_a_host_is_refused_naming_the_setting_only(url):
    with pytest.raises(ConfigError) as refused:
        loggable_target(url, "audit.forward_url")
    assert str(refused.value) == "audit.forward_url must be an http:// or https:// URL with a host"
