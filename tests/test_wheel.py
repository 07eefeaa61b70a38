"""The wheel is the broker: built from this checkout and installed in a fresh virtualenv, it carries
the templates (kept at the top of the checkout) and the OpenBao policy, renders the login page and
prints the policy, without the checkout on its path."""

from __future__ import annotations

import site
import subprocess
import sys
import tomllib
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

POLICY = """
[entitlements.read]
description = "Read"
backend = "vault_token"
vault_policies = ["read"]
max_duration = "1h"

[entitlements.read.requesters]
groups = ["engineers"]
"""
RENDER_LOGIN_PAGE = """
import sys
import broker
from broker import create_app
from broker.config import load_settings

assert broker.__file__.startswith(sys.prefix), broker.__file__  # the wheel, not the checkout
data = sys.argv[1]
app = create_app(load_settings(overrides={
    "server": {"data_dir": data, "base_url": "http://127.0.0.1:5000"},
    "oidc": {"issuer": "http://127.0.0.1:9", "client_id": "jit-broker", "api_audience": "api"},
    "vault": {"addr": "http://127.0.0.1:9", "token": "unused", "timeout": 1},
    "policy": {"path": data + "/policy.toml"},
    "reaper": {"enabled": False},
}, environ={}))
page = app.test_client().get("/")
print(page.status_code, page.get_data(as_text=True))
"""


def test_every_package_of_broker_is_in_the_wheel():
    """pyproject lists the packages (templates/ is mapped in); a new one must be listed too."""
    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    on_disk = {
        ".".join(path.parent.relative_to(ROOT).parts)
        for path in (ROOT / "broker").rglob("*.py")
        if "__pycache__" not in path.parts
    }
    assert on_disk <= listed, sorted(on_disk - listed)


def test_the_wheel_renders_the_login_page_from_a_fresh_virtualenv(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(dist), str(ROOT)],
        check=True,
    )
    (wheel,) = dist.glob("jit_broker-*.whl")
    env = tmp_path / "venv"
    venv.create(env, with_pip=False)
    python = env / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
         str(wheel)],
        check=True,
    )  # fmt: skip
    # The dependencies come from the test's own environment, after the fresh one's: a path added
    # by a .pth file is searched, but its own .pth files (the checkout's editable install) are not.
    fresh = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    Path(fresh, "dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    data = tmp_path / "data"
    data.mkdir()
    (data / "policy.toml").write_text(POLICY)

    rendered = subprocess.run(
        [python, "-c", RENDER_LOGIN_PAGE, str(data)],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert rendered.returncode == 0, rendered.stderr
    status, _, page = rendered.stdout.partition(" ")
    assert status == "200"
    assert "/auth/login" in page and "<html" in page.lower()

    printed = subprocess.run(
        [env / "bin" / "jit", "vault-policy"], capture_output=True, text=True, cwd=tmp_path
    )
    assert printed.returncode == 0, printed.stderr
    assert 'path "auth/token/create/jit-broker"' in printed.stdout
