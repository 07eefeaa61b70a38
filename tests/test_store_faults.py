"""The broker's own store failing for real: a filesystem that is full (a small tmpfs), a database
file made unwritable (`chattr +i`, which stops root too), a file that is no database. Each time:
a 503 with a JSON error, nothing issued in OpenBao, `/readyz` failing and naming the problem;
and once the store is usable again, health recovers and requests work."""

from __future__ import annotations

import os
import re
import subprocess
import threading
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests
from werkzeug.serving import make_server

from broker.errors import StoreUnavailable
from broker.store import SqliteStore as Store
from scripts.launchers import follow_login, free_port
from tests.helpers import browser, csrf, sqlite_only, token_works, wait_for_status

# Every fault here is a SQLite file's own (a full filesystem, an immutable file, a file that is
# no database); tests/test_store_postgres.py has the PostgreSQL store's (the server unreachable).
pytestmark = sqlite_only

ASK = {"entitlement": "kv-read", "duration": "10m", "reason": "INC-10 store faults"}


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs of the test's own (root may mount here and in CI; skipped where not)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path) -> Path:
    """Write until the filesystem says it is full; the file is the space to give back."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as out:  # unbuffered: nothing left to fail at close
        try:
            while True:
                out.write(b"\0" * 65536)
        except OSError as exc:
            assert exc.errno == 28, exc  # ENOSPC
    return filler


@pytest.fixture
def serve(tokens):
    """Serve an app over real HTTP, one thread per request as in production: each request
    opens its own connection to the store, as a broker's new threads do."""
    servers = []

    def start(app):
        server = make_server("127.0.0.1", free_port(), app, threaded=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        url = f"http://127.0.0.1:{server.server_port}"

        def call(method, path, body=None, user="alice"):
            headers = {"Authorization": f"Bearer {tokens(user)}"}
            return requests.request(method, url + path, json=body, headers=headers, timeout=30)

        call.url = url
        return call

    yield start
    for server in servers:
        server.shutdown()


def health(call):
    response = call("GET", "/readyz")
    return response.status_code, response.json()


def health_of(app):
    response = app.test_client().get("/readyz")
    return response.status_code, response.get_json()


def held_grant_ids(jit) -> set[str]:
    """The grants OpenBao holds a token of this broker for, asked of OpenBao itself."""
    return {holding.grant_id for holding in jit.grants.backends["vault_token"].holdings()}


def grant_count(jit) -> int:
    return jit.grants.store.db.execute("SELECT count(*) AS n FROM grants").fetchone()["n"]


def test_a_full_disk_gives_503_fails_health_and_recovers_when_space_returns(
    small_disk, make_app, api_for, openbao
):
    app = make_app(storage={"path": str(small_disk / "broker.db")}, reaper={"enabled": True})
    jit = app.extensions["jit"]
    api = api_for(app)
    try:
        held = api("POST", "/api/v1/requests", ASK)  # issued while there was room
        assert held.status_code == 201
        held_id, held_token = held.get_json()["id"], held.get_json()["credential"]["token"]
        in_vault, recorded = held_grant_ids(jit), grant_count(jit)
        filler = fill(small_disk)

        refused = api("POST", "/api/v1/requests", ASK)
        assert refused.status_code == 503
        # The request's own record cannot be committed, before Vault is asked (issue 15: no
        # separate write check per request any more, so no longer broker_unhealthy).
        assert refused.get_json()["error"] == "store_unavailable"
        assert "SQLITE_FULL" in refused.get_json()["detail"]
        assert grant_count(jit) == recorded
        assert held_grant_ids(jit) == in_vault  # no new token with any grant's metadata

        status, body = health_of(app)
        assert (status, body["status"]) == (503, "failing")
        assert not body["checks"]["store"]["ok"]
        assert "database or disk is full (SQLITE_FULL)" in body["checks"]["store"]["error"]

        # A write that health does not guard (release is never blocked) is a 503 too, and
        # leaves the grant as it was: still active, its token still working, nothing recorded.
        release = api("POST", f"/api/v1/requests/{held_id}/release")
        assert release.status_code == 503, release.get_data(as_text=True)
        assert release.get_json()["error"] == "store_unavailable"
        assert "SQLITE_FULL" in release.get_json()["detail"]
        assert jit.grants.store.get_grant(held_id).status == "active"
        assert token_works(openbao, held_token)
        assert api("GET", f"/api/v1/requests/{held_id}").status_code == 200  # reads still work

        filler.unlink()
        status, body = health_of(app)
        assert (status, body["status"]) == (200, "ok"), body
        again = api("POST", "/api/v1/requests", ASK)
        assert again.status_code == 201
        assert token_works(openbao, again.get_json()["credential"]["token"])
        assert api("POST", f"/api/v1/requests/{held_id}/release").status_code == 200
        wait_for_status(jit.grants, held_id, "revoked")  # the reaper, woken by the release
        assert not token_works(openbao, held_token)
    finally:
        jit.stop()


def test_a_disk_filling_while_vault_answers_revokes_what_it_issued(
    small_disk, make_app, api_for, openbao
):
    """The store passes its check, then fills between Vault's answer and the record: the
    credential nobody can record is revoked at once, and the caller hears 503, not 500."""
    app = make_app(storage={"path": str(small_disk / "broker.db")})
    grants = app.extensions["jit"].grants
    backend = grants.backends["vault_token"]
    vault_issue = backend.issue
    issued = []

    def issue_then_fill(*args, **kwargs):
        credential = vault_issue(*args, **kwargs)
        issued.append(credential.secret)
        fill(small_disk)
        return credential

    backend.issue = issue_then_fill
    refused = api_for(app)("POST", "/api/v1/requests", ASK)

    assert refused.status_code == 503
    assert refused.get_json()["error"] == "store_unavailable"
    assert "SQLITE_FULL" in refused.get_json()["detail"]
    assert "revoked at once; nothing was issued" in refused.get_json()["detail"]
    (secret,) = issued
    assert not token_works(openbao, secret)
    assert "issue" not in [entry["type"] for entry in grants.store.audit_entries()]


def test_a_database_file_made_unwritable_gives_503_and_fails_health(make_app, serve, openbao):
    app = make_app(reaper={"enabled": True})
    jit = app.extensions["jit"]
    call = serve(app)
    database = jit.settings.database_path
    frozen = [database, database.with_name(database.name + "-wal")]
    in_vault, recorded = held_grant_ids(jit), grant_count(jit)
    try:
        for path in frozen:
            changed = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True)
            if changed.returncode != 0:
                pytest.skip(f"chattr +i is not possible here: {changed.stderr.strip()}")

        status, body = health(call)
        assert (status, body["status"]) == (503, "failing")
        assert "attempt to write a readonly database" in body["checks"]["store"]["error"]
        assert "SQLITE_READONLY" in body["checks"]["store"]["error"]

        refused = call("POST", "/api/v1/requests", ASK)
        assert refused.status_code == 503
        assert refused.json()["error"] == "store_unavailable"  # its record, before Vault
        assert "SQLITE_READONLY" in refused.json()["detail"]
        assert call("GET", "/api/v1/requests").status_code == 200  # reading is still possible
    finally:
        for path in frozen:
            subprocess.run(["chattr", "-i", str(path)], check=False)
    assert grant_count(jit) == recorded
    assert held_grant_ids(jit) == in_vault

    status, body = health(call)
    assert (status, body["status"]) == (200, "ok"), body
    issued = call("POST", "/api/v1/requests", ASK)
    assert issued.status_code == 201
    assert token_works(openbao, issued.json()["credential"]["token"])
    jit.stop()


def test_a_store_that_cannot_be_read_gives_503_on_reads_and_health(make_app, serve):
    app = make_app()
    jit = app.extensions["jit"]
    call = serve(app)
    grant_id = call("POST", "/api/v1/requests", ASK).json()["id"]
    database = jit.settings.database_path
    jit.grants.store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # everything in the file
    kept = database.with_name("kept.db")
    os.link(database, kept)
    garbage = database.with_name("garbage")
    garbage.write_bytes(os.urandom(8192))
    os.replace(garbage, database)  # what a new connection opens is no database any more
    try:
        for path in ("/api/v1/requests", f"/api/v1/requests/{grant_id}"):
            response = call("GET", path)
            assert response.status_code == 503, path
            assert response.json()["error"] == "store_unavailable"
            assert "SQLITE_NOTADB" in response.json()["detail"]
        status, body = health(call)
        assert status == 503 and "SQLITE_NOTADB" in body["checks"]["store"]["error"]
        assert not body["checks"]["revoke_failed"]["ok"]  # unknown is not "none"
    finally:
        os.replace(kept, database)
    assert call("GET", f"/api/v1/requests/{grant_id}").json()["status"] == "active"


def test_the_store_translates_only_what_means_unavailable(tmp_path):
    not_a_database = tmp_path / "broker.db"
    not_a_database.write_bytes(os.urandom(4096))
    with pytest.raises(StoreUnavailable, match="SQLITE_NOTADB") as raised:
        Store(not_a_database).get_grant("x")
    assert raised.value.status == 503

    store = Store(tmp_path / "good.db")
    store.migrate()
    store.check_writable()
    store.check_writable()
    assert store.db.execute("SELECT writes FROM write_check").fetchone()["writes"] == 2
    with pytest.raises(Exception) as bug:  # the broker's own bad SQL stays a plain error (500)
        store.db.execute("SELECT no_such_column FROM grants")
    assert not isinstance(bug.value, StoreUnavailable)


# --- browser sessions are kept in the store too ---------------------------------------------------
# Flask opens and saves a session outside the views, where an error is a bare 500: these pin
# that a store that cannot be used is the same 503 there as anywhere else.


def assert_store_unavailable_page(response) -> None:
    text = response.get_data(as_text=True)
    assert response.status_code == 503, text[-600:]
    assert "store unavailable" in text and re.search(r"SQLITE_(FULL|NOTADB)", text), text[-600:]


def session_subjects(jit) -> list[str]:
    rows = jit.grants.store.db.execute("SELECT subject FROM web_sessions")
    return [row[0] for row in rows]


def test_logging_in_on_a_full_disk_is_503_until_space_returns(small_disk, make_app):
    app = make_app(storage={"path": str(small_disk / "broker.db")})
    jit = app.extensions["jit"]
    client = app.test_client()
    filler = fill(small_disk)
    assert_store_unavailable_page(client.get("/auth/login"))  # the login state cannot be kept
    filler.unlink()

    start = client.get("/auth/login")
    assert start.status_code == 302
    callback = urlsplit(
        follow_login(
            requests.Session(), start.headers["Location"], "alice", stop_at_redirect_uri=True
        )
    )
    filler = fill(small_disk)
    # The provider said yes, but the signed-in session cannot be stored: nobody is signed in.
    assert_store_unavailable_page(client.get(f"{callback.path}?{callback.query}"))
    filler.unlink()
    assert "alice" not in session_subjects(jit)
    assert "alice@example.com" not in client.get("/").get_data(as_text=True)

    page = browser(app, "alice").get("/").get_data(as_text=True)
    assert "alice@example.com" in page


def test_a_logout_the_store_cannot_record_is_503_and_the_session_goes_on(small_disk, make_app):
    """Saying "logged out" while the session still works would be a lie: a 503, then a logout
    that works once there is room, after which the cookie is worth nothing."""
    app = make_app(storage={"path": str(small_disk / "broker.db")})
    client = browser(app, "alice")
    token = csrf(client.get("/").get_data(as_text=True))
    filler = fill(small_disk)
    assert_store_unavailable_page(client.post("/auth/logout", data={"csrf_token": token}))
    filler.unlink()
    assert "alice@example.com" in client.get("/").get_data(as_text=True)
    assert client.post("/auth/logout", data={"csrf_token": token}).status_code == 303
    assert "alice@example.com" not in client.get("/").get_data(as_text=True)
    assert session_subjects(app.extensions["jit"]) == []


def test_a_session_the_store_cannot_read_is_503_not_500_nor_a_csrf_error(make_app, serve):
    app = make_app()
    jit = app.extensions["jit"]
    url = serve(app).url
    client = browser(app, "alice")
    cookie = client.get_cookie("session").value
    token = csrf(client.get("/").get_data(as_text=True))
    database = jit.settings.database_path
    jit.grants.store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    kept = database.with_name("kept.db")
    os.link(database, kept)
    garbage = database.with_name("garbage")
    garbage.write_bytes(os.urandom(8192))
    os.replace(garbage, database)  # each request of the server opens this: no database
    try:
        as_alice = {"cookies": {"session": cookie}, "allow_redirects": False, "timeout": 30}
        page = requests.get(url + "/", **as_alice)
        assert page.status_code == 503, page.text[-600:]
        assert "SQLITE_NOTADB" in page.text
        refused = requests.post(url + "/requests", data={"csrf_token": token}, **as_alice)
        assert refused.status_code == 503, refused.text[-600:]
        assert "SQLITE_NOTADB" in refused.text
    finally:
        os.replace(kept, database)
    assert "alice@example.com" in requests.get(url + "/", **as_alice).text
