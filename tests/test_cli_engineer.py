"""The engineers' `jit` against a real broker process (`jit serve`), the real OIDC provider, OpenBao
and PostgreSQL: logging in through the provider's own pages (the loopback flow and the device
flow), requesting and waiting while an approver approves from a second CLI identity, running real
commands with the credential, and every fault with its exit code. Each CLI run is its own process
with its own config directory, as two people on two machines."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from scripts.launchers import ManagedProcess, follow_login, free_port, wait_for_http
from tests.helpers import broker_sections, role_exists, token_works, wait_until

JIT = str(Path(sys.executable).parent / "jit")

CLI_POLICY = """
[entitlements.kv-read]
default_duration = "10m"
description = "Read the test secrets"
backend = "vault_token"
vault_policies = ["jit-test-read"]
max_duration = "1h"

[entitlements.kv-read.requesters]
groups = ["engineers"]

[entitlements.kv-approved]
default_duration = "10m"
description = "Change the test secrets, with an approval"
backend = "vault_token"
vault_policies = ["jit-test-admin"]
max_duration = "1h"

[entitlements.kv-approved.requesters]
groups = ["engineers"]

[entitlements.kv-approved.approval]
required = 1
from_groups = ["security"]
expires_after = "1h"

[entitlements.kv-approved.break_glass]
groups = ["engineers"]
reviewers = ["security"]
max_duration = "10m"

[entitlements.kv-admin]
description = "Only for security"
backend = "vault_token"
vault_policies = ["jit-test-admin"]
max_duration = "15m"

[entitlements.kv-admin.requesters]
groups = ["security"]

[entitlements.db-read]
default_duration = "10m"
description = "Read the test database"
backend = "database"
max_duration = "1h"

[entitlements.db-read.requesters]
groups = ["engineers"]

[entitlements.db-read.database]
role = "readonly"
connect = "postgresql://{host}:{port}/{dbname}"

[entitlements.ssh-deploy]
default_duration = "10m"
description = "Log in to the deploy hosts"
backend = "ssh"
max_duration = "1h"

[entitlements.ssh-deploy.requesters]
groups = ["engineers"]

[entitlements.ssh-deploy.ssh]
role = "jit-users"
principals = ["deploy"]
"""


def _toml(sections: dict[str, dict]) -> str:
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def cli_broker(
    tmp_path_factory, openbao, oidc_provider, oidc_client_secret, vault_setup, database_engine,
    postgres, inventory, ssh_engine,
):  # fmt: skip
    """`jit serve` as its own process, publishing the CLI's login (client jit-cli)."""
    workdir = tmp_path_factory.mktemp("cli-broker")
    port = free_port()
    policy = CLI_POLICY.format(host=postgres.host, port=postgres.port, dbname=postgres.dbname)
    (workdir / "policy.toml").write_text(policy)
    sections = broker_sections(workdir, openbao, oidc_provider, port, oidc_client_secret)
    sections["server"].update(host="127.0.0.1", port=port)
    sections["reaper"] = {"retry_min": 1, "retry_max": 2}
    sections["postgres"] = {"dsn": postgres.dsn}
    sections["cli"] = {"client_id": "jit-cli"}
    config = workdir / "config.toml"
    config.write_text(_toml(sections))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_", "JIT_"))}
    process = ManagedProcess("jit-serve", [JIT, "-c", str(config), "serve"], workdir / "log", env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{url}/api/v1/cli", 30, process)
    except BaseException:
        process.stop()
        raise
    yield url
    process.stop()


class Jit:
    """One person's `jit`: its own config directory (XDG_CONFIG_HOME), the broker in JIT_BROKER."""

    def __init__(self, home: Path, broker: str) -> None:
        self.home = home
        self.broker = broker

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_", "JIT_"))}
        env.update(
            XDG_CONFIG_HOME=str(self.home),
            JIT_BROKER=self.broker,
            PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '/usr/bin:/bin')}",
        )
        return env

    def run(
        self, *args: str, timeout: float = 60, typed: str | None = None, **env: str
    ) -> subprocess.CompletedProcess:
        return subprocess.run(
            [JIT, *args],
            env={**self.env, **env},
            capture_output=True,
            text=True,
            timeout=timeout,
            input=typed,
            stdin=subprocess.DEVNULL if typed is None else None,
        )

    def start(self, *args: str) -> subprocess.Popen:
        """As a command typed at a terminal: SIGINT at its default (scripts/test runs the suite
        in the background, where the shell makes its children ignore SIGINT, as jit then does)."""
        return subprocess.Popen(
            [JIT, *args],
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # noqa: PLW1509
        )

    def json(self, *args: str) -> object:
        done = self.run(*args, "--json")
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    @property
    def login_file(self) -> Path:
        return next((self.home / "jit" / "brokers").glob("*/login.json"))

    def kept_credentials(self) -> list[Path]:
        return list((self.home / "jit" / "brokers").glob("*/grants/*.json"))

    def copy(self, home: Path) -> Jit:
        shutil.copytree(self.home, home)
        return Jit(home, self.broker)


def read_until(stream, pattern: str, timeout: float = 30) -> tuple[re.Match, str]:
    """Lines of a child's output until one matches `pattern` (bounded by the child's own
    timeouts: a child that exits ends the stream)."""
    seen = ""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = stream.readline()
        if not line:
            break
        seen += line
        found = re.search(pattern, line)
        if found:
            return found, seen
    raise AssertionError(f"no line matching {pattern!r} in:\n{seen}")


def browser_login(jit: Jit, username: str) -> subprocess.CompletedProcess:
    """`jit login --no-browser`, its URL walked through the provider's form as a browser would,
    back to the CLI's loopback callback."""
    child = jit.start("login", "--broker", jit.broker, "--no-browser", "--timeout", "60")
    found, _ = read_until(child.stderr, r"^\s+(http://\S+)")
    page = follow_login(requests.Session(), found.group(1), username)
    assert page.status_code == 200 and "logged in to jit" in page.text
    out, err = child.communicate(timeout=60)
    return subprocess.CompletedProcess(child.args, child.returncode, out, err)


def device_login(jit: Jit, username: str) -> subprocess.CompletedProcess:
    """`jit login --device`: the code's URL confirmed and logged into on "another device"."""
    child = jit.start("login", "--broker", jit.broker, "--device")
    found, _ = read_until(child.stderr, r"\(or open (http://\S+)\)")
    page = follow_login(requests.Session(), found.group(1), username, device=True)
    assert "Signed in" in page.text
    out, err = child.communicate(timeout=60)
    return subprocess.CompletedProcess(child.args, child.returncode, out, err)


@pytest.fixture(scope="module")
def alice(cli_broker, tmp_path_factory):
    jit = Jit(tmp_path_factory.mktemp("alice-home"), cli_broker)
    done = browser_login(jit, "alice")
    assert done.returncode == 0, done.stderr
    assert "logged in to" in done.stderr and "Alice Engineer" in done.stderr
    return jit


@pytest.fixture(scope="module")
def bob(cli_broker, tmp_path_factory):
    """The approver, logged in with the device flow."""
    jit = Jit(tmp_path_factory.mktemp("bob-home"), cli_broker)
    done = device_login(jit, "bob")
    assert done.returncode == 0, done.stderr
    return jit


def gone_from_vault(openbao, token: str) -> bool:
    return wait_until(lambda: not token_works(openbao, token), timeout=20)


# --- logging in ------------------------------------------------------------------------------


def test_the_broker_publishes_what_the_cli_needs_to_log_in(cli_broker, oidc_provider):
    info = requests.get(f"{cli_broker}/api/v1/cli", timeout=10).json()
    assert info == {
        "issuer": oidc_provider.issuer,
        "client_id": "jit-cli",
        "scopes": "openid email profile groups",
        "audience": "urn:jit-broker:api",
        "vault_addr": info["vault_addr"],
    }
    assert info["vault_addr"].startswith("http://127.0.0.1:")


def test_a_browser_login_keeps_the_tokens_private_and_prints_none(alice):
    login = json.loads(alice.login_file.read_text())
    assert login["broker"] == alice.broker and login["refresh_token"]
    assert oct(alice.login_file.stat().st_mode & 0o777) == "0o600"
    assert oct(alice.login_file.parent.stat().st_mode & 0o777) == "0o700"
    whoami = alice.run("whoami")
    assert whoami.returncode == 0, whoami.stderr
    assert "Alice Engineer <alice@example.com>" in whoami.stdout
    assert "groups   engineers" in whoami.stdout and "expires in" in whoami.stdout
    for secret in (login["access_token"], login["refresh_token"]):
        assert secret not in whoami.stdout + whoami.stderr


def test_a_device_login_polls_until_the_code_is_entered_elsewhere(bob):
    me = bob.json("whoami")
    assert me["identity"]["subject"] == "bob"
    assert me["identity"]["groups"] == ["engineers", "security"]


def test_the_first_login_is_the_default_broker_and_logout_forgets_it(cli_broker, tmp_path, alice):
    jit = alice.copy(tmp_path / "home")
    remembered = json.loads((jit.home / "jit" / "config.json").read_text())
    assert remembered == {"broker": cli_broker}
    done = jit.run("whoami", JIT_BROKER="")  # no flag, no variable: the config file's broker
    assert done.returncode == 0, done.stderr
    assert jit.run("logout").returncode == 0
    assert not list((jit.home / "jit" / "brokers").glob("*/login.json"))
    after = jit.run("status")
    assert after.returncode == 6 and "not logged in" in after.stderr


def test_an_expired_login_is_renewed_with_the_refresh_token(cli_broker, tmp_path):
    jit = Jit(tmp_path / "carol", cli_broker)
    assert browser_login(jit, "carol").returncode == 0
    before = json.loads(jit.login_file.read_text())
    jit.login_file.write_text(json.dumps({**before, "expires_at": time.time() - 60}))
    done = jit.run("whoami", "--json")
    assert done.returncode == 0, done.stderr
    after = json.loads(jit.login_file.read_text())
    assert after["access_token"] != before["access_token"]
    assert after["refresh_token"] != before["refresh_token"]  # the provider rotates it
    assert after["expires_at"] > time.time()
    assert oct(jit.login_file.stat().st_mode & 0o777) == "0o600"


# --- what may I have ------------------------------------------------------------------------


def test_ls_lists_what_i_may_request_and_with_all_what_not_and_why(alice):
    listed = alice.run("ls")
    assert listed.returncode == 0, listed.stderr
    lines = {line.split()[0]: line for line in listed.stdout.splitlines() if line[:1].strip()}
    assert set(lines) == {"kv-read", "kv-approved", "db-read", "ssh-deploy"}
    assert "up to 1 h" in lines["kv-read"] and "no approval needed" in lines["kv-read"]
    assert "needs 1 approval from members of security" in lines["kv-approved"]
    everything = alice.run("ls", "--all").stdout
    assert re.search(r"kv-admin\s+not for you: kv-admin admits .*security.*engineers", everything)


# --- request, wait, approve, activate -------------------------------------------------------


def test_request_waits_while_an_approver_approves_then_activates(alice, bob, openbao):
    child = alice.start("request", "kv-approved", "--for", "10m", "--reason", "INC-1 rotate")
    found, _ = read_until(child.stderr, r"request (\S+) needs approval")
    grant_id = found.group(1)
    read_until(child.stderr, r"waiting for approval of .*missing 1 more.*approvers: 1 approval")
    queue = bob.json("approvals")
    assert [g["id"] for g in queue] == [grant_id] and queue[0]["reason"] == "INC-1 rotate"
    approved = bob.run("approve", grant_id, "--reason", "fine for INC-1")
    assert approved.returncode == 0, approved.stderr
    assert "is approved" in approved.stderr
    out, err = child.communicate(timeout=30)
    assert child.returncode == 0, err
    assert "kv-approved is active until in 9 min" in err or "is active until in 10 min" in err
    assert "jit exec kv-approved -- COMMAND" in err and "VAULT_TOKEN" not in out + err
    env = alice.run("env", grant_id)
    assert env.returncode == 0, env.stderr
    token = re.search(r"export VAULT_TOKEN=(\S+)", env.stdout).group(1)
    assert f"export VAULT_ADDR={openbao.addr}" in env.stdout
    assert token_works(openbao, token)
    shown = alice.run("show", grant_id)
    assert "approvals    1 required; given: bob@example.com" in shown.stdout
    assert re.search(r"\n\s+\d+\s+.*approval\s+bob", shown.stdout)
    released = alice.run("release", grant_id)
    assert released.returncode == 0 and "is released" in released.stderr
    assert gone_from_vault(openbao, token)
    assert not alice.kept_credentials()


def test_ctrl_c_while_waiting_leaves_the_request_and_jit_wait_resumes_it(alice, bob, openbao):
    child = alice.start("request", "kv-approved", "--reason", "INC-2 look")
    found, _ = read_until(child.stderr, r"request (\S+) needs approval")
    grant_id = found.group(1)
    read_until(child.stderr, r"waiting for approval")
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=30)
    assert child.returncode == 4, err
    assert f"request {grant_id} is still pending. Resume with: jit wait {grant_id}" in err
    assert "Traceback" not in err
    assert alice.json("show", grant_id)["status"] == "pending"
    assert bob.run("approve", grant_id).returncode == 0
    resumed = alice.run("wait", grant_id, "--json")
    assert resumed.returncode == 0, resumed.stderr
    grant = json.loads(resumed.stdout)
    assert grant["status"] == "active" and "credential" not in grant
    assert alice.run("release", grant_id).returncode == 0


def test_a_denied_request_ends_waiting_with_exit_3_and_the_reason(alice, bob):
    pending = alice.run("request", "kv-approved", "--reason", "INC-3 please", "--no-wait")
    assert pending.returncode == 4, pending.stderr
    grant_id = re.search(r"request (\S+) waits for approval", pending.stderr).group(1)
    assert f"jit wait {grant_id}" in pending.stderr
    denied = bob.run("deny", grant_id, "--reason", "use kv-read")
    assert denied.returncode == 0 and "is denied" in denied.stderr
    waited = alice.run("wait", grant_id)
    assert waited.returncode == 3
    assert waited.stderr.strip() == f"jit: request {grant_id} was denied: use kv-read"


def test_a_request_that_waits_too_long_exits_4_and_cancel_withdraws_it(alice):
    waited = alice.run("request", "kv-approved", "--reason", "INC-4 wait", "--timeout", "1")
    assert waited.returncode == 4 and "still pending after 1 s" in waited.stderr
    grant_id = re.search(r"jit wait (\S+)", waited.stderr).group(1)
    cancelled = alice.run("cancel", grant_id, "--json")
    assert cancelled.returncode == 0 and json.loads(cancelled.stdout)["status"] == "cancelled"


def test_break_glass_needs_the_name_typed_or_yes_and_says_so_loudly(alice):
    asked = ("break-glass", "kv-approved", "--reason", "INC-5 payments down")
    unconfirmed = alice.run(*asked)
    assert unconfirmed.returncode == 2 and "--yes" in unconfirmed.stderr
    assert "BREAK-GLASS" in unconfirmed.stderr and "reviewed" in unconfirmed.stderr
    mistyped = alice.run(*asked, typed="kv-read\n")
    assert mistyped.returncode == 2 and "does not match; nothing was requested" in mistyped.stderr
    assert not [g for g in alice.json("status") if g.get("break_glass")]
    for confirmed in (alice.run(*asked, typed="kv-approved\n"), alice.run(*asked, "--yes")):
        assert confirmed.returncode == 0, confirmed.stderr
        grant_id = re.search(r"active until .*: grant (\S+)", confirmed.stderr).group(1)
        shown = alice.json("show", grant_id)
        assert shown["break_glass"] is True and shown["status"] == "active"
        assert alice.run("release", grant_id).returncode == 0


def test_json_output_is_the_apis_with_the_secret_left_out(alice):
    done = alice.run("request", "kv-read", "--for", "5m", "--reason", "look", "--json")
    assert done.returncode == 0, done.stderr
    grant = json.loads(done.stdout)
    assert grant["status"] == "active" and grant["entitlement"] == "kv-read"
    assert "credential" not in grant
    status = alice.json("status")
    assert grant["id"] in [g["id"] for g in status]
    assert alice.run("release", grant["id"]).returncode == 0


# --- exec ------------------------------------------------------------------------------------


def test_exec_runs_bao_with_the_token_and_releases_the_grant_when_it_exits(
    alice, openbao, tmp_path
):
    seen = tmp_path / "token"
    script = f'bao token lookup -format=json && printf %s "$VAULT_TOKEN" > {seen}'
    done = alice.run(
        "exec", "kv-read", "--for", "5m", "--reason", "debug", "--", "sh", "-c", script
    )
    assert done.returncode == 0, done.stderr
    lookup = json.loads(done.stdout)
    assert "jit-test-read" in lookup["data"]["policies"]
    token = seen.read_text()
    assert token not in done.stderr
    assert "released grant" in done.stderr
    assert gone_from_vault(openbao, token)
    assert not alice.kept_credentials()


def test_exec_runs_psql_as_a_database_user_of_its_own_then_drops_it(alice, postgres, tmp_path):
    seen = tmp_path / "user"
    script = f"psql -tA -c 'select 1' && printf %s \"$PGUSER\" > {seen}"
    done = alice.run("exec", "db-read", "--reason", "debug", "--", "sh", "-c", script)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "1"
    username = seen.read_text()
    assert username and username not in done.stdout + done.stderr
    assert wait_until(lambda: not role_exists(postgres, username), timeout=20)
    assert not alice.kept_credentials()


def test_exec_exits_with_the_commands_status_and_forwards_signals(alice):
    failed = alice.run("exec", "kv-read", "--reason", "x", "--", "sh", "-c", "exit 7")
    assert failed.returncode == 7, failed.stderr
    child = alice.start(
        "exec", "kv-read", "--reason", "x", "--", "sh", "-c",
        'trap "echo got TERM; exit 9" TERM; echo ready; while :; do sleep 0.1; done',
    )  # fmt: skip
    assert child.stdout.readline().strip() == "ready"
    child.send_signal(signal.SIGTERM)
    out, err = child.communicate(timeout=30)
    assert child.returncode == 9 and "got TERM" in out, err
    assert "released grant" in err


def test_exec_stops_the_command_when_the_window_ends(alice):
    started = time.monotonic()
    done = alice.run("exec", "kv-read", "--for", "3s", "--reason", "x", "--", "sleep", "60")
    assert time.monotonic() - started < 30
    assert done.returncode == 128 + signal.SIGTERM, done.stderr
    assert "the window ends in" in done.stderr
    assert "the window has ended: stopping the command" in done.stderr


def test_exec_of_a_command_that_does_not_exist_exits_127_and_releases(alice):
    done = alice.run("exec", "kv-read", "--reason", "x", "--", "no-such-command-here")
    assert done.returncode == 127
    assert "jit: no-such-command-here: command not found" in done.stderr
    assert "released grant" in done.stderr
    assert not alice.kept_credentials()
    live = [g for g in alice.json("status") if g["entitlement"] == "kv-read"]
    assert live == []


def test_exec_reuses_a_kept_grant_and_leaves_it(alice, openbao):
    kept = alice.json("request", "kv-read", "--for", "5m", "--reason", "keep")
    done = alice.run("exec", "kv-read", "--", "sh", "-c", 'test -n "$VAULT_TOKEN"')
    assert done.returncode == 0, done.stderr
    assert f"running with grant {kept['id']}" in done.stderr
    assert alice.json("show", kept["id"])["status"] == "active"
    assert alice.run("release", kept["id"]).returncode == 0


# --- faults ----------------------------------------------------------------------------------


def test_an_unreachable_broker_exits_5(tmp_path):
    jit = Jit(tmp_path / "home", f"http://127.0.0.1:{free_port()}")
    done = jit.run("login")
    assert done.returncode == 5
    assert done.stderr.strip() == f"jit: cannot reach the broker at {jit.broker}"


def test_no_login_exits_6(cli_broker, tmp_path):
    done = Jit(tmp_path / "home", cli_broker).run("ls")
    assert done.returncode == 6
    assert done.stderr.strip() == (
        f"jit: not logged in to {cli_broker}; run: jit login --broker {cli_broker}"
    )


def test_an_expired_login_without_a_refresh_token_exits_6(alice, tmp_path):
    jit = alice.copy(tmp_path / "home")
    login = json.loads(jit.login_file.read_text())
    jit.login_file.write_text(
        json.dumps({**login, "expires_at": time.time() - 60, "refresh_token": ""})
    )
    done = jit.run("status")
    assert done.returncode == 6
    assert done.stderr.strip() == f"jit: your login to {jit.broker} has expired; run: jit login"


def test_a_refresh_token_the_provider_rejects_exits_6(alice, tmp_path):
    jit = alice.copy(tmp_path / "home")
    login = json.loads(jit.login_file.read_text())
    jit.login_file.write_text(
        json.dumps({**login, "expires_at": time.time() - 60, "refresh_token": "not-a-token"})
    )
    done = jit.run("status")
    assert done.returncode == 6
    assert "the identity provider would not renew your login" in done.stderr
    assert "run: jit login" in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_an_identity_provider_out_of_reach_when_renewing_exits_5(alice, tmp_path):
    jit = alice.copy(tmp_path / "home")
    login = json.loads(jit.login_file.read_text())
    gone = f"http://127.0.0.1:{free_port()}"
    login["login"]["issuer"] = gone
    jit.login_file.write_text(json.dumps({**login, "expires_at": time.time() - 60}))
    done = jit.run("status")
    assert done.returncode == 5
    assert done.stderr.strip().startswith(f"jit: cannot reach the identity provider at {gone}")


def test_a_grant_that_is_not_mine_exits_3(alice, bob):
    grant = alice.json("request", "kv-read", "--for", "5m", "--reason", "mine")
    for action in ("release", "show"):
        stolen = bob.run(action, grant["id"])
        assert stolen.returncode == 3, stolen.stderr
        assert stolen.stderr.strip() == f"jit: no grant {grant['id']} of yours"
    assert alice.json("show", grant["id"])["status"] == "active"
    assert alice.run("release", grant["id"]).returncode == 0


def test_a_policy_refusal_exits_3_with_the_brokers_words(alice):
    done = alice.run("request", "kv-admin", "--reason", "want")
    assert done.returncode == 3
    assert done.stderr.startswith("jit: kv-admin admits") and "Traceback" not in done.stderr


def test_a_login_file_others_can_read_is_refused_by_name(alice, tmp_path):
    jit = alice.copy(tmp_path / "home")
    jit.login_file.chmod(0o644)
    done = jit.run("status")
    assert done.returncode == 1
    assert done.stderr.startswith(f"jit: {jit.login_file} may be read or changed by others")
    assert "chmod 600" in done.stderr


def test_bad_input_is_a_usage_error_not_a_traceback(alice):
    for args in (("request", "kv-read"), ("exec", "kv-read"), ("login", "--broker", "ftp://x")):
        done = alice.run(*args)
        assert done.returncode == 2, (args, done.stderr)
        assert "Traceback" not in done.stderr
    bad_id = alice.run("show", "../../audit")
    assert bad_id.returncode == 1 and "is not a grant id" in bad_id.stderr
    plain = alice.run("login", "--broker", "http://jit.example.com")
    assert plain.returncode == 2 and "https://" in plain.stderr


# --- the API the CLI stands on -----------------------------------------------------------------


def test_a_broker_without_a_cli_client_says_so_with_a_404(make_app):
    answer = make_app().test_client().get("/api/v1/cli")
    assert answer.status_code == 404
    assert answer.json["error"] == "cli_login_off" and "[cli] client_id" in answer.json["detail"]


def test_the_chain_of_someone_elses_grant_is_a_404_and_mine_has_no_data(make_app, api_for):
    call = api_for(make_app())
    grant = call("POST", "/api/v1/requests", {"entitlement": "kv-read", "reason": "r",
                                              "duration": "5m"}).json  # fmt: skip
    assert call("GET", f"/api/v1/requests/{grant['id']}/chain", user="carol").status_code == 404
    entries = call("GET", f"/api/v1/requests/{grant['id']}/chain").json["entries"]
    assert [e["type"] for e in entries][:3] == ["request", "decision", "issue"]
    assert all(set(e) == {"seq", "at", "type", "actor"} for e in entries)
    assert call("POST", f"/api/v1/requests/{grant['id']}/release").status_code == 200


# What the command sees of an SSH credential: the key's directory and mode, and the certificate's
# principals and end, read with cryptography (no sshd needed to check what ssh would present).
SSH_PROBE = """
import os
from cryptography.hazmat.primitives.serialization import load_ssh_public_identity
key, cert = os.environ["JIT_SSH_KEY"], os.environ["JIT_SSH_CERT"]
identity = load_ssh_public_identity(open(cert, "rb").read())
print(key)
print(oct(os.stat(os.path.dirname(key)).st_mode & 0o777), oct(os.stat(key).st_mode & 0o777))
print(",".join(p.decode() for p in identity.valid_principals), identity.valid_before)
"""


def test_exec_with_an_ssh_certificate_hands_over_a_key_and_certificate_then_removes_them(alice):
    started = time.time()
    done = alice.run(
        "exec", "ssh-deploy", "--reason", "INC-9 deploy", "--", sys.executable, "-c", SSH_PROBE
    )
    assert done.returncode == 0, done.stderr
    key, modes, certificate = done.stdout.strip().splitlines()
    principals, valid_before = certificate.split()
    assert modes == "0o700 0o600"  # a private directory, a private key
    assert principals == "deploy"
    assert started < int(valid_before) <= started + 10 * 60 + 60  # the window's end
    assert "ssh -i" in done.stderr and "CertificateFile=" in done.stderr
    assert not Path(key).exists() and not Path(key).parent.exists()  # removed afterwards
    assert "released grant" in done.stderr
