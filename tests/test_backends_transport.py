"""hvac over the broker's own transport (broker/backends/transport.py, urllib3 without requests'
session) answers as it did over requests: the real OpenBao's answers and refusals, the same
exceptions for a Vault that is down or slow, and a proxy from the environment still honoured."""

import socket
import threading

import certifi
import hvac.exceptions
import pytest
import requests

from broker.backends.transport import DirectSession
from broker.backends.vault import make_client, translate_errors
from broker.errors import VaultUnavailable
from scripts.launchers import OpenBao, free_port
from tests.vault_in_front import in_front_of


@pytest.fixture(scope="module")
def openbao_tls(tmp_path_factory):
    """An OpenBao dev server on HTTPS, its certificate signed by a CA of its own."""
    bao = OpenBao.start(workdir=tmp_path_factory.mktemp("openbao-tls"), tls=True)
    yield bao
    bao.stop()


@pytest.fixture
def client(openbao):
    made = make_client(openbao.addr, openbao.root_token, timeout=5)
    assert isinstance(made.session, DirectSession)
    yield made
    made.session.close()


def test_calls_and_answers_go_through_as_over_requests(client):
    """A JSON body, a JSON answer, a LIST, a call with no body in the answer (204)."""
    made = client.auth.token.create(policies=["default"], ttl="60s", meta={"jit": "transport"})
    accessor = made["auth"]["accessor"]
    assert client.auth.token.lookup_accessor(accessor)["data"]["meta"] == {"jit": "transport"}
    assert accessor in client.list("auth/token/accessors")["data"]["keys"]
    assert client.auth.token.revoke_accessor(accessor).status_code == 204
    with pytest.raises(hvac.exceptions.InvalidRequest, match="invalid accessor"):
        client.auth.token.lookup_accessor(accessor)


def test_a_refusal_is_the_exception_hvac_raises_with_openbaos_words(openbao):
    refused = make_client(openbao.addr, "not-a-token", timeout=5)
    with pytest.raises(hvac.exceptions.Forbidden, match="permission denied"):
        refused.auth.token.lookup_self()


def test_an_answer_given_in_front_of_openbao_reaches_hvac_as_given(client):
    with in_front_of(client) as front:
        front.answer("GET", "/v1/auth/token/lookup-self", 503, {"errors": ["Vault is sealed"]})
        with pytest.raises(hvac.exceptions.VaultDown, match="sealed"):
            client.auth.token.lookup_self()
        assert client.auth.token.lookup_self()["data"]["policies"] == ["root"]  # passed through


def test_a_redirect_is_followed_with_its_body_as_requests_would(client, openbao):
    """A standby node's 307 to the active one: the call goes there, body and all."""
    create = "/v1/auth/token/create"
    with in_front_of(client) as front:
        front.answer("POST", create, 307, headers={"Location": f"{openbao.addr}{create}"})
        made = client.auth.token.create(policies=["default"], ttl="60s", meta={"via": "307"})
    assert client.auth.token.lookup_accessor(made["auth"]["accessor"])["data"]["meta"] == {
        "via": "307"
    }


def test_vault_unreachable_is_vault_unavailable():
    nowhere = make_client(f"http://127.0.0.1:{free_port()}", "token", timeout=2)
    with pytest.raises(requests.ConnectionError):
        nowhere.auth.token.lookup_self()
    with pytest.raises(VaultUnavailable, match="ConnectionError"):
        translate_errors(nowhere.auth.token.lookup_self)()


def test_vault_that_never_answers_is_a_read_timeout():
    """A server that accepts the connection and says nothing: the call's timeout ends it."""
    silent = socket.create_server(("127.0.0.1", 0))
    accepted = []
    threading.Thread(target=lambda: accepted.append(silent.accept()), daemon=True).start()
    try:
        slow = make_client(f"http://127.0.0.1:{silent.getsockname()[1]}", "token", timeout=1)
        with pytest.raises(requests.ReadTimeout):
            slow.auth.token.lookup_self()
    finally:
        silent.close()


def test_a_proxy_from_the_environment_is_still_used(openbao, monkeypatch):
    """HTTP_PROXY pointing nowhere: the call fails at the proxy, so it went the proxy's way."""
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{free_port()}")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    proxied = make_client(openbao.addr, openbao.root_token, timeout=2)
    with pytest.raises(requests.exceptions.ProxyError):
        proxied.auth.token.lookup_self()


def test_openbao_over_https_is_trusted_only_through_the_ca_the_environment_names(
    openbao_tls, monkeypatch
):
    """REQUESTS_CA_BUNDLE naming the server's CA: the call goes through. A bundle without it:
    the certificate is refused (requests' SSLError), which is VaultUnavailable to the broker."""
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(openbao_tls.ca_cert))
    trusted = make_client(openbao_tls.addr, openbao_tls.root_token, timeout=5)
    assert trusted.auth.token.lookup_self()["data"]["policies"] == ["root"]
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", certifi.where())
    untrusted = make_client(openbao_tls.addr, openbao_tls.root_token, timeout=5)
    with pytest.raises(requests.exceptions.SSLError):
        untrusted.auth.token.lookup_self()
    with pytest.raises(VaultUnavailable, match="SSLError"):
        translate_errors(untrusted.auth.token.lookup_self)()
