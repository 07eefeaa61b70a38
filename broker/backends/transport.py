"""How hvac's calls reach Vault: the requests `Session` hvac is given, its calls sent by urllib3
(the HTTP library under requests) directly. requests' own Python per call (preparing the request,
merging the environment's settings, hooks, cookies, building the response) was more than half of
the broker's CPU per Vault call (0.43 ms a call through requests, 0.19 ms through urllib3, on the
bench machine), and every grant makes one to three calls. hvac still builds every call and reads
every answer: this module knows nothing of Vault."""

from __future__ import annotations

import json as json_module
import os
from typing import Any
from urllib.parse import urlencode, urlsplit

import requests
import urllib3
from requests.structures import CaseInsensitiveDict
from requests.utils import DEFAULT_CA_BUNDLE_PATH, get_encoding_from_headers
from urllib3.exceptions import (
    ConnectTimeoutError,
    HTTPError,
    MaxRetryError,
    NewConnectionError,
    ProxyError,
    ReadTimeoutError,
    ResponseError,
    SSLError,
)

# requests' defaults: no retries, a read error raised at once, redirects followed (up to 30: a
# standby Vault node redirects to the active one), or not when the caller says so.
FOLLOWING = urllib3.Retry(total=None, connect=0, read=False, status=0, other=0, redirect=30)
NOT_FOLLOWING = urllib3.Retry(total=None, connect=0, read=False, status=0, other=0, redirect=False)
POOL_SIZE = 32  # connections kept per Vault origin: one per serving thread, as many as the bench's
# The arguments hvac passes; a call with any other goes requests' own way.
SENT_DIRECTLY = frozenset(
    ("headers", "timeout", "allow_redirects", "verify", "cert", "proxies", "stream")
    + ("params", "data", "json")
)


class DirectSession(requests.Session):
    """A requests `Session` whose calls urllib3 sends: the ones hvac makes (a method, a URL,
    headers, a JSON body or query parameters, a timeout, TLS settings). Anything else (a proxy
    from the environment, files, cookies, auth) takes requests' own path, unchanged. The
    environment's settings (proxies, CA bundle) are read once for each origin: they do not
    change while the broker runs."""

    def __init__(self) -> None:
        super().__init__()
        self._settled: dict[tuple[object, ...], dict[str, Any]] = {}
        self._pools: dict[tuple[object, ...], urllib3.PoolManager] = {}

    def request(self, method: str | bytes, url: str | bytes, *args: Any, **kwargs: Any) -> Any:
        if args or set(kwargs) - SENT_DIRECTLY or kwargs.get("stream"):
            return super().request(method, url, *args, **kwargs)
        method, url = _text(method).upper(), _text(url)
        settings = self._settings(
            url, kwargs.get("proxies"), kwargs.get("verify"), kwargs.get("cert")
        )
        if settings["proxies"].get(urlsplit(url).scheme) or settings["proxies"].get("all"):
            return super().request(method, url, **kwargs)
        headers = dict(kwargs.get("headers") or {})
        body = kwargs.get("data")
        if kwargs.get("json") is not None:
            body = json_module.dumps(kwargs["json"], allow_nan=False).encode()
            headers.setdefault("Content-Type", "application/json")
        if kwargs.get("params"):
            url += ("&" if "?" in url else "?") + urlencode(kwargs["params"], doseq=True)
        follow = kwargs.get("allow_redirects", True)
        try:
            answer = self._pool(settings["verify"], settings["cert"]).request(
                method,
                url,
                body=body,
                headers=headers,
                timeout=_timeout(kwargs.get("timeout")),
                retries=FOLLOWING if follow else NOT_FOLLOWING,
                redirect=follow,
            )
        except HTTPError as exc:
            raise _as_requests_error(exc) from exc
        return _response(answer, url)

    def _settings(self, url: str, proxies: Any, verify: Any, cert: Any) -> dict[str, Any]:
        key = (urlsplit(url)[:2], repr(proxies), repr(verify), repr(cert))
        settled = self._settled.get(key)
        if settled is None:
            settled = dict(self.merge_environment_settings(url, proxies or {}, None, verify, cert))
            self._settled[key] = settled
        return settled

    def _pool(self, verify: Any, cert: Any) -> urllib3.PoolManager:
        """One pool manager for each TLS setting, as requests keeps one adapter's pools."""
        key = (repr(verify), repr(cert))
        pool = self._pools.get(key)
        if pool is None:
            tls: dict[str, Any] = {}
            if verify is False:
                tls["cert_reqs"] = "CERT_NONE"
            else:
                bundle = DEFAULT_CA_BUNDLE_PATH if verify in (None, True) else str(verify)
                tls["cert_reqs"] = "CERT_REQUIRED"
                tls["ca_cert_dir" if os.path.isdir(bundle) else "ca_certs"] = bundle
            if cert:
                tls["cert_file"], tls["key_file"] = (cert, None) if isinstance(cert, str) else cert
            pool = self._pools[key] = urllib3.PoolManager(maxsize=POOL_SIZE, **tls)
        return pool

    def close(self) -> None:
        for pool in self._pools.values():
            pool.clear()
        super().close()


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _timeout(timeout: Any) -> urllib3.Timeout:
    if isinstance(timeout, tuple):
        return urllib3.Timeout(connect=timeout[0], read=timeout[1])
    return urllib3.Timeout(connect=timeout, read=timeout)


def _as_requests_error(exc: HTTPError) -> requests.RequestException:
    """urllib3's failure as the requests exception hvac's callers catch, as requests maps it."""
    reason = exc.reason if isinstance(exc, MaxRetryError) else exc
    if isinstance(reason, ConnectTimeoutError) and not isinstance(reason, NewConnectionError):
        return requests.ConnectTimeout(str(exc))
    if isinstance(reason, ReadTimeoutError):
        return requests.ReadTimeout(str(exc))
    if isinstance(reason, SSLError):
        return requests.exceptions.SSLError(str(exc))
    if isinstance(reason, ProxyError):
        return requests.exceptions.ProxyError(str(exc))
    if isinstance(reason, ResponseError):  # redirected too many times
        return requests.TooManyRedirects(str(exc))
    return requests.ConnectionError(str(exc))


def _response(answer: urllib3.BaseHTTPResponse, url: str) -> requests.Response:
    """The answer as the requests `Response` hvac reads (status, headers, body, JSON)."""
    response = requests.Response()
    response.status_code = answer.status
    response.reason = answer.reason or ""
    response.headers = CaseInsensitiveDict(answer.headers)
    response.encoding = get_encoding_from_headers(response.headers)
    response.url = answer.geturl() or url
    response._content = answer.data  # noqa: SLF001 - the body, read whole as requests would
    return response
