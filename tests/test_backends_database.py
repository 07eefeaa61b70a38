"""Database credentials end to end: real access tokens from the OIDC provider, real users from
OpenBao's database engine in a real PostgreSQL. A user ends by the window end, a release drops it
and ends its open sessions, and a removal nobody could confirm is never recorded as revoked."""

from datetime import timedelta

import psycopg
import pytest

from broker import audit
from broker.backends import make_backends
from broker.backends.vault import make_client
from broker.models import parse_time
from scripts.launchers import free_port
from tests.helpers import DATABASE_POLICY, connect_as, login_refused, role_exists


@pytest.fixture
def app(make_app, postgres, database_engine, inventory):
    return make_app(policy_text=DATABASE_POLICY, postgres={"dsn": postgres.dsn})


@pytest.fixture
def grants(app):
    return app.extensions["jit"].grants


@pytest.fixture
def api(app, api_for):
    return api_for(app)


def ask(api, duration="10m"):
    body = {"entitlement": "db-read", "duration": duration, "reason": "INC-7 read the inventory"}
    response = api("POST", "/api/v1/requests", body=body)
    assert response.status_code == 201, response.get_json()
    return response.get_json()


def test_a_request_gives_a_postgres_user_that_ends_by_the_window_end(api, grants, postgres):
    body = ask(api)
    credential = body["credential"]
    assert credential["type"] == "database"
    assert set(credential) == {"type", "username", "password", "expires_at"}
    end = parse_time(body["window"]["end"])
    assert parse_time(credential["expires_at"]) <= end

    with connect_as(postgres, credential) as session:
        assert session.execute("SELECT item FROM inventory").fetchall() == [("spanner",)]
    with psycopg.connect(postgres.dsn) as admin:
        (valid_until,) = admin.execute(
            "SELECT rolvaliduntil FROM pg_roles WHERE rolname = %s", (credential["username"],)
        ).fetchone()
    assert end - timedelta(seconds=30) < valid_until <= end + timedelta(seconds=1)

    # The chain holds the user name only as an HMAC, and never the password.
    issued = next(e for e in grants.chain(body["id"]) if e["type"] == "issue")
    chain_text = str(grants.chain(body["id"]))
    assert credential["username"] not in chain_text and credential["password"] not in chain_text
    username_mark = audit.fingerprint(grants.fingerprint_key, credential["username"])
    assert issued["data"]["identifiers"]["username"] == username_mark
    api("POST", f"/api/v1/requests/{body['id']}/release")
    grants.reap_due()


def test_release_drops_the_user_and_ends_its_open_sessions(api, grants, postgres):
    body = ask(api)
    credential = body["credential"]
    session = connect_as(postgres, credential)  # opened before the release, kept open
    assert session.execute("SELECT 1").fetchone() == (1,)

    assert api("POST", f"/api/v1/requests/{body['id']}/release").status_code == 200
    grants.reap_due()

    assert grants.store.get_grant(body["id"]).status == "revoked"
    assert login_refused(postgres, credential)
    assert not role_exists(postgres, credential["username"])
    with pytest.raises(psycopg.OperationalError):
        session.execute("SELECT 1")
    session.close()
    revoke, verify = grants.chain(body["id"])[-2:]
    assert (revoke["type"], revoke["data"]["accepted"]) == ("revoke", True)
    assert (verify["type"], verify["data"]["gone"]) == ("verify", True)
    assert "pg_roles" in verify["data"]["method"]
    assert audit.verify(grants.store.audit_entries()).ok


def test_the_user_is_removed_when_the_window_ends(api, grants, postgres):
    body = ask(api, "10s")
    credential = body["credential"]
    assert not login_refused(postgres, credential)
    grants.reap_due(parse_time(body["window"]["end"]))
    assert grants.store.get_grant(body["id"]).status == "revoked"
    assert login_refused(postgres, credential)


def test_a_window_too_short_for_a_database_user_is_refused(api):
    response = api(
        "POST",
        "/api/v1/requests",
        body={"entitlement": "db-read", "duration": "3s", "reason": "too quick"},
    )
    assert response.status_code == 400
    assert "at least" in response.get_json()["detail"]


def test_an_extension_gives_a_new_user_and_removes_the_old_one(api, grants, postgres):
    body = ask(api)
    old = body["credential"]
    extended = api("POST", f"/api/v1/requests/{body['id']}/extend", body={"duration": "5m"})
    assert extended.status_code == 200, extended.get_json()
    new = extended.get_json()["credential"]
    assert new["username"] != old["username"]
    assert login_refused(postgres, old)
    session = connect_as(postgres, new)
    assert session.execute("SELECT count(*) FROM inventory").fetchone() == (1,)
    assert next(e for e in reversed(grants.chain(body["id"])) if e["type"] == "verify")["data"][
        "gone"
    ]

    # The new user is removed with its own role's statements, sessions first: removing the old
    # user must not have taken the new user's role with it.
    api("POST", f"/api/v1/requests/{body['id']}/release")
    grants.reap_due()
    assert grants.store.get_grant(body["id"]).status == "revoked"
    assert login_refused(postgres, new)
    with pytest.raises(psycopg.OperationalError):
        session.execute("SELECT 1")
    session.close()


def test_vault_out_of_reach_is_revoke_failed_and_the_user_still_exists(api, grants, postgres):
    body = ask(api)
    credential = body["credential"]
    working = grants.backends
    grants.backends = make_backends(
        make_client(f"http://127.0.0.1:{free_port()}", "x", 2), postgres.dsn, 2
    )
    end = parse_time(body["window"]["end"])

    grants.reap_due(end)
    failed = grants.store.get_grant(body["id"])
    assert failed.status == "revoke_failed" and "unavailable" in failed.last_error
    assert grants.chain(body["id"])[-2]["data"]["gone"] is False
    assert not login_refused(postgres, credential)  # honestly: still alive, and recorded so

    grants.backends = working
    grants.reap_due(parse_time(failed.due_at))
    assert grants.store.get_grant(body["id"]).status == "revoked"
    assert login_refused(postgres, credential)


def test_postgres_out_of_reach_during_verification_is_never_gone(api, grants, postgres, openbao):
    body = ask(api)
    working = grants.backends
    # Vault revokes the lease (and drops the user), but the broker cannot look into PostgreSQL.
    grants.backends = make_backends(
        make_client(openbao.addr, openbao.broker_token, 5),
        f"postgresql://nobody:x@127.0.0.1:{free_port()}/postgres",
        2,
    )
    grants.reap_due(parse_time(body["window"]["end"]))
    failed = grants.store.get_grant(body["id"])
    assert failed.status == "revoke_failed"
    assert "PostgreSQL could not be asked" in failed.last_error
    assert grants.chain(body["id"])[-2]["data"]["gone"] is False

    grants.backends = working
    grants.reap_due(parse_time(failed.due_at))
    assert grants.store.get_grant(body["id"]).status == "revoked"
