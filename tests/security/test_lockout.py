"""Account lockout by strangers: password-login throttling must slow a guesser
down without letting anyone who knows a user name keep its owner out.

pink-web runs behind a "router" here (`web.trusted_proxies` = 127.0.0.1), so
each request names its client address in X-Real-IP, as nginx does; the limits
are the shipped ones (`web.throttle`).
"""

from __future__ import annotations

import pytest
import requests

from pink import users
from web import throttle

STRANGERS = [f"10.66.0.{n}" for n in range(1, 40)]


@pytest.fixture
def routed(pink_processes, pink_config, config_variant):
    """pink-web trusting X-Real-IP from 127.0.0.1, the tests' router."""
    pink_processes.web(config_variant("routed", web={"trusted_proxies": ["127.0.0.1"]}))
    return pink_config


def _ca(config) -> str:
    from tests.helpers import Api

    return Api(config, "").ca


def _api_login(config, name: str, password: str, address: str,
               http: requests.Session | None = None) -> requests.Response:
    """`pink login` (no cookie jar unless `http` has one) from `address`."""
    return (http or requests).post(config.web.url + "/api/v1/login", json={"username": name, "password": password},
                                   headers={"X-Real-IP": address}, verify=_ca(config), timeout=60)


def _page_login(http: requests.Session, config, name: str, password: str, address: str) -> requests.Response:
    """The login form, as a browser keeping its cookies."""
    return http.post(config.web.url + "/login", data={"username": name, "password": password},
                     headers={"X-Real-IP": address}, verify=_ca(config), timeout=60, allow_redirects=False)


def _distributed_guess(config, name: str, addresses: list[str]) -> int:
    """Wrong passwords for `name` from each address until it is refused; returns the failures let through."""
    failures = 0
    for address in addresses:
        while True:
            status = _api_login(config, name, "wrong-guess", address).status_code
            if status == 429:
                break
            assert status == 401
            failures += 1
    return failures


def _lock_everything(config, name: str, owner_address: str) -> None:
    """A stranger hits every limit a stranger can: failures for `name` from the owner's own
    (shared) address, names sprayed from it, and failures from many other addresses."""
    _distributed_guess(config, name, [owner_address])
    for n in range(throttle.ADDRESS_ATTEMPTS[0]):
        _api_login(config, f"ghost{n}", "x", owner_address)
    assert "too many login attempts from" in _api_login(config, name, "x", owner_address).json()["message"]
    guessed = _distributed_guess(config, name, STRANGERS)
    assert guessed <= throttle.ACCOUNT_FAILURES[0]
    refused = _api_login(config, name, "wrong-guess", "10.77.0.1")
    assert refused.status_code == 429 and "too many failed logins" in refused.json()["message"]


@pytest.mark.parametrize("admin", [True, False], ids=["admin", "user"])
def test_strangers_cannot_lock_the_owner_out(routed, admin):
    """A user cannot be locked out of password login by strangers: failures from other
    addresses (every limit hit), or from the owner's own shared address, do not stop the owner
    logging in from their known device or from an address they logged in from before; admins included."""
    created = users.create_user(routed, "ada", admin=admin)
    password = created["password"]
    assert _api_login(routed, "ada", password, "10.1.0.1").status_code == 200  # the CLI at the office
    browser = requests.Session()
    assert _page_login(browser, routed, "ada", password, "10.1.0.2").status_code == 302  # the laptop
    device = browser.cookies.get(throttle.DEVICE_COOKIE)
    assert device
    cookie_header = _page_login(requests.Session(), routed, "ada", password, "10.1.0.2").headers["Set-Cookie"]
    assert all(flag in cookie_header.lower() for flag in ("httponly", "secure", "samesite=strict"))

    _lock_everything(routed, "ada", "10.1.0.2")

    assert _api_login(routed, "ada", password, "10.1.0.1").status_code == 200
    for address in ("10.1.0.2", "10.99.0.9"):  # the known device, at its own address (shared) or away
        laptop = requests.Session()
        laptop.cookies.set(throttle.DEVICE_COOKIE, device)
        r = _page_login(laptop, routed, "ada", password, address)
        assert r.status_code == 302 and r.headers["Location"].endswith("/"), r.text[:300]
    forged = requests.Session()
    forged.cookies.set(throttle.DEVICE_COOKIE, device[:-4] + "AAAA")
    assert _page_login(forged, routed, "ada", password, "10.99.0.10").status_code == 429


def test_distributed_guessing_is_still_throttled(routed):
    """A password guesser using many addresses gets at most ACCOUNT_FAILURES guesses per window
    at an account, and no single address more than USER_FAILURES; then every address the owner
    never used is refused before any password check, even with the right password."""
    created = users.create_user(routed, "bo")
    guessed = _distributed_guess(routed, "bo", STRANGERS)
    assert guessed == throttle.ACCOUNT_FAILURES[0]
    per_address = _distributed_guess(routed, "bo", ["10.1.1.1"])
    assert per_address == 0
    for address in ("10.88.0.1", "10.88.0.2"):
        r = _api_login(routed, "bo", created["password"], address)
        assert r.status_code == 429 and int(r.headers["Retry-After"]) > 0


def test_tokens_are_not_affected_by_login_throttling(routed):
    """A user's API bearer token keeps working from any address while password logins to their
    account, and from that address, are refused."""
    created = users.create_user(routed, "cy")
    _distributed_guess(routed, "cy", ["10.1.0.5"])
    for n in range(throttle.ADDRESS_ATTEMPTS[0]):
        _api_login(routed, f"ghost{n}", "x", "10.1.0.5")
    assert _api_login(routed, "cy", created["password"], "10.1.0.5").status_code == 429
    me = requests.get(routed.web.url + "/api/v1/me", headers={"Authorization": f"Bearer {created['token']}",
                                                              "X-Real-IP": "10.1.0.5"},
                      verify=_ca(routed), timeout=60)
    assert me.status_code == 200 and me.json()["user"]["name"] == "cy"


def test_the_cli_keeps_its_device_so_a_lab_mate_on_its_address_cannot_keep_it_out(routed, tmp_path):
    """`pink login` keeps the device cookie the server gives it: a stranger behind
    the same address (a lab's NAT) who hits every limit there cannot stop the
    owner's CLI from logging in again."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from pink_cli import settings

    created = users.create_user(routed, "dee")
    saved = tmp_path / "cli.toml"
    env = {**os.environ, "PINK_CLI_CONFIG": str(saved), "PINK_PASSWORD": created["password"]}
    env.pop("PINK_TOKEN", None)
    login = [str(Path(sys.executable).parent / "pink"), "login", "--url", routed.web.url, "--ca", _ca(routed),
             "--username", "dee"]
    first = subprocess.run(login, env=env, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    assert settings.load(saved).device  # the CLI is a known device now

    _lock_everything(routed, "dee", "127.0.0.1")  # the CLI's own address, as the server sees it

    elsewhere = [*login]
    elsewhere[3] = routed.web.url.replace("127.0.0.1", "localhost")  # another server, as far as the CLI knows
    refused = subprocess.run(elsewhere, env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "too many" in refused.stderr  # the device was not sent to it
    again = subprocess.run(login, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
