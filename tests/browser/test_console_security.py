"""The console's own locks, end to end: `fleetctl ui` as a child, tried as an attacker would.

Between the operator's certificate (which `fleetctl ui` holds) and anyone
else stand the one-time login link, the session cookie it is exchanged for,
the Host check (DNS rebinding), the Origin check (cross-site requests) and a
Content-Security-Policy. Each is tried here from outside, over HTTP or in
Chromium, with a control showing the same request passes when it should.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any

import httpx
import pytest
from console_helpers import (
    CONTEXT_OPTIONS,
    Console,
    Fleetctl,
    PageErrors,
    open_page,
    running_console,
    session_cookie,
    shot,
    start_console,
)
from daemon_helpers import short_tmp
from playwright.sync_api import Browser, Page, expect

API = "/v1/fleet.v1.FleetService"
LABEL = "console-security"
"""An operator label key only this module sets (on node-1)."""


@pytest.fixture
def http(console: Console, console_session: dict[str, Any]) -> Iterator[httpx.Client]:
    """An HTTP client for the console holding the browser's session cookie."""
    name, value = session_cookie(console_session)
    with httpx.Client(
        base_url=console.origin, cookies={name: value}, follow_redirects=False, timeout=30
    ) as client:
        yield client


@pytest.fixture
def stranger(console: Console) -> Iterator[httpx.Client]:
    """An HTTP client for the console without a session: another local user, say."""
    with httpx.Client(base_url=console.origin, follow_redirects=False, timeout=30) as client:
        yield client


def post(client: httpx.Client, method: str, body: str, **headers: str) -> httpx.Response:
    """POST a JSON body to FleetService `method` through the console, with `headers`."""
    return client.post(
        f"{API}/{method}", content=body, headers={"content-type": "application/json", **headers}
    )


def operator_labels(fleetctl: Fleetctl, node_id: str) -> dict[str, str]:
    """The node's labels as the manager has them (asked with fleetctl, not the console)."""
    labels: dict[str, str] = fleetctl.json("nodes", "show", node_id)["labels"]
    return labels


def script_sources(csp: str) -> list[str]:
    """The sources a Content-Security-Policy allows scripts from (script-src, else default-src)."""
    directives = {
        name: values for name, *values in (part.split() for part in csp.split(";") if part.strip())
    }
    return directives.get("script-src", directives.get("default-src", ["*"]))


def test_nothing_is_served_without_the_session_cookie(
    stranger: httpx.Client, http: httpx.Client, console: Console
) -> None:
    """The page, its scripts and the API all answer 403 to a client that did not log in."""
    origin = {"origin": console.origin}
    refused = [
        stranger.get("/"),
        stranger.get("/static/js/app.js"),
        post(stranger, "ListNodes", "{}", **origin),
    ]
    for response in refused:
        assert response.status_code == 403, response.request.url
        assert "opens with the link `fleetctl ui` printed" in response.text
    assert http.get("/").status_code == 200
    assert post(http, "ListNodes", "{}", **origin).status_code == 200


def test_the_login_link_opens_one_session_once(fleetctl_config: Path) -> None:
    """The link answers 303 with an HttpOnly SameSite=Strict cookie once; then 403, no cookie."""
    with short_tmp() as workdir, running_console(fleetctl_config, workdir) as fresh:
        with httpx.Client(follow_redirects=False, timeout=30) as client:
            wrong = client.get(fresh.login_url.replace("secret=", "secret=x"))
            first = client.get(fresh.login_url)
            again = client.get(fresh.login_url)
        assert wrong.status_code == 403, "a wrong secret must not log in"
        assert first.status_code == 303
        assert first.headers["location"] == "/"
        cookie = SimpleCookie(first.headers["set-cookie"])
        [(name, morsel)] = cookie.items()
        assert name == f"fleet_console_{fresh.port}"
        assert morsel["httponly"] is True
        assert morsel["samesite"].lower() == "strict"
        assert morsel["path"] == "/"
        assert again.status_code == 403
        assert "already used" in again.text
        assert "set-cookie" not in again.headers
        with httpx.Client(cookies={name: morsel.value}, timeout=30) as browser_like:
            assert browser_like.get(fresh.url()).status_code == 200


def test_the_browser_keeps_the_cookie_from_scripts(page: Page, console: Console) -> None:
    """In Chromium the session cookie is HttpOnly and SameSite=Strict: no script can read it."""
    page.goto("/")
    [cookie] = [c for c in page.context.cookies() if c["name"] == f"fleet_console_{console.port}"]
    assert cookie["httpOnly"] is True
    assert cookie["sameSite"] == "Strict"
    assert page.evaluate("document.cookie") == ""


def test_every_response_carries_a_csp_without_unsafe_scripts(
    http: httpx.Client, stranger: httpx.Client, console: Console
) -> None:
    """Page, static file, API answer and refusals all carry a CSP allowing no inline or eval."""
    responses = {
        "the page": http.get("/"),
        "a script": http.get("/static/js/app.js"),
        "an API answer": post(http, "ListNodes", "{}", origin=console.origin),
        "a refusal": stranger.get("/"),
        "a used login link": stranger.get(console.login_url),
    }
    for what, response in responses.items():
        csp = response.headers.get("content-security-policy")
        assert csp, f"{what} ({response.status_code}) has no Content-Security-Policy"
        sources = script_sources(csp)
        assert sources == ["'self'"], f"{what}: scripts allowed from {sources} ({csp})"


def test_the_browser_refuses_an_injected_inline_script(
    browser: Browser, console: Console, console_session: dict[str, Any]
) -> None:
    """A <script> someone slips into the page does not run, and Chromium reports the violation."""
    inject = """() => {
        const s = document.createElement('script');
        s.textContent = 'window.__injected = true';
        document.body.append(s);
        return window.__injected === true;
    }"""
    errors = PageErrors()
    context = browser.new_context(
        **CONTEXT_OPTIONS, storage_state=console_session, base_url=console.origin
    )
    errors.watch(context)
    try:
        page = context.new_page()
        page.goto("/")
        ran = page.evaluate(inject)
    finally:
        context.close()
    assert ran is False, "the injected inline script ran"
    assert [e for e in errors.seen if "Content Security Policy" in e], errors.seen


def test_a_cross_origin_post_is_refused_and_changes_nothing(
    http: httpx.Client, console: Console, fleetctl: Fleetctl
) -> None:
    """UpdateNodeLabels with a foreign, null, other-port or no Origin: 403, labels untouched."""
    body = f'{{"nodeId": "node-1", "set": {{"{LABEL}": "pwned"}}}}'
    origins = {
        "a foreign site": "http://evil.example",
        "a sandboxed frame": "null",
        "another port": f"http://127.0.0.1:{console.port + 1}",
        "another name for this host": f"http://localhost:{console.port}",
        "https": f"https://127.0.0.1:{console.port}",
    }
    for what, origin in origins.items():
        refused = post(http, "UpdateNodeLabels", body, origin=origin)
        assert refused.status_code == 403, what
        assert "cross-origin request refused" in refused.text, what
    missing = post(http, "UpdateNodeLabels", body)
    assert missing.status_code == 403
    assert "Origin 'missing'" in missing.text
    assert LABEL not in operator_labels(fleetctl, "node-1")
    # The same request from the console's own origin goes through.
    done = post(http, "UpdateNodeLabels", body, origin=console.origin)
    assert done.status_code == 200, done.text
    assert operator_labels(fleetctl, "node-1")[LABEL] == "pwned"
    post(http, "UpdateNodeLabels", f'{{"nodeId": "node-1", "remove": ["{LABEL}"]}}',
         origin=console.origin).raise_for_status()  # fmt: skip


def test_a_request_for_another_host_name_is_refused(http: httpx.Client, console: Console) -> None:
    """DNS rebinding: a page at evil.example resolved to 127.0.0.1 gets 403, cookie or not."""
    rebound = f"evil.example:{console.port}"
    page = http.get("/", headers={"host": rebound})
    api = post(http, "ListNodes", "{}", host=rebound, origin=f"http://{rebound}")
    for response in (page, api):
        assert response.status_code == 403
        assert f"the request named '{rebound}'" in response.text
    assert http.get("/", headers={"host": f"localhost:{console.port}"}).status_code == 200


def test_the_overview_loads_without_errors(page: Page) -> None:
    """The overview renders its data for operator alice with no console errors; screenshot."""
    open_page(page, "#/", "overview")
    expect(page.locator("header .who")).to_contain_text("alice")
    shot(page, "overview")


def test_stopping_with_a_followed_stream_open_ends_it_cleanly(fleetctl_config: Path) -> None:
    """SIGTERM while a browser follows events: the stream ends, exit 0, no traceback."""
    with short_tmp() as workdir:
        fresh = start_console(fleetctl_config, workdir)
        try:
            with httpx.Client(timeout=30) as client:
                assert client.get(fresh.login_url, follow_redirects=False).status_code == 303
                with client.stream(
                    "POST",
                    f"{fresh.origin}/v1/fleet.v1.FleetService/WatchEvents",
                    content='{"follow": true, "tail": 0}',
                    headers={"content-type": "application/json", "origin": fresh.origin},
                ) as stream:
                    assert stream.status_code == 200
                    fresh.process.send_signal(signal.SIGTERM)
                    # The stream ends (no more bytes) instead of being cut off.
                    assert list(stream.iter_bytes()) == []
            assert fresh.process.wait(10) == 0
        finally:
            fresh.stop()
        stderr = fresh.stderr()
        assert "Traceback" not in stderr, stderr
        assert "graceful shutdown exceeded" not in stderr, stderr
