"""The status page's files (orchestrator/api/ui/, served by api/status_page.py): served at /ui/
with a self-only Content-Security-Policy, shipped as package data, and written so the admin
token lives in session storage and is never put in a URL or API data into HTML.

tests/e2e/test_status_page.py loads the page in Chromium on a real sweep.
"""

from __future__ import annotations

import fnmatch
import re
import tomllib
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import pytest
from cotune.orchestrator.api import status_page
from fastapi import FastAPI
from fastapi.testclient import TestClient

ROOT = Path(__file__).resolve().parents[2]
UI = ROOT / "orchestrator" / "api" / "ui"
APP_JS = (UI / "app.js").read_text()


@pytest.fixture(scope="module")
def client() -> TestClient:
    app = FastAPI()
    status_page.mount(app)
    return TestClient(app)


def test_ui_redirects_to_the_folder_which_serves_index_html_with_the_csp(
    client: TestClient,
) -> None:
    moved = client.get("/ui", follow_redirects=False)
    assert moved.status_code == 308 and moved.headers["location"] == "/ui/"

    page = client.get("/ui/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert page.text == (UI / "index.html").read_text()
    csp = page.headers["content-security-policy"]
    assert csp == status_page.CONTENT_SECURITY_POLICY
    directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
    assert directives["default-src"] == "'none'"
    for name in ("script-src", "style-src", "connect-src"):
        assert directives[name] == "'self'", name
    assert "unsafe" not in csp
    assert page.headers["x-content-type-options"] == "nosniff"
    assert page.headers["referrer-policy"] == "no-referrer"


@pytest.mark.parametrize(
    ("name", "content_type"), [("app.js", "javascript"), ("style.css", "text/css")]
)
def test_the_script_and_style_are_served_with_the_csp(
    client: TestClient, name: str, content_type: str
) -> None:
    answer = client.get(f"/ui/{name}")
    assert answer.status_code == 200
    assert content_type in answer.headers["content-type"]
    assert answer.headers["content-security-policy"] == status_page.CONTENT_SECURITY_POLICY
    assert client.get("/ui/missing.js").status_code == 404


class _Elements(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.found: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.found.append((tag, dict(attrs)))


def test_index_html_has_nothing_inline_the_csp_would_block() -> None:
    parser = _Elements()
    parser.feed((UI / "index.html").read_text())
    tags = parser.found
    scripts = [attrs for tag, attrs in tags if tag == "script"]
    assert scripts == [{"src": "app.js", "defer": None}]  # no inline script
    assert not [tag for tag, _ in tags if tag == "style"]
    assert not [(tag, a) for tag, a in tags if "style" in a or any(k.startswith("on") for k in a)]
    links = [a for tag, a in tags if tag == "link"]
    assert links == [{"rel": "stylesheet", "href": "style.css"}]  # this origin only


def test_the_token_input_cannot_put_the_token_in_a_url() -> None:
    """A form submitted without JS sends its named inputs in the URL (GET): the token input
    has no name and the form no action, so there is nothing to send."""
    parser = _Elements()
    parser.feed((UI / "index.html").read_text())
    form = next(a for tag, a in parser.found if tag == "form")
    token_input = next(a for tag, a in parser.found if a.get("id") == "token-input")
    assert form.get("id") == "token-form" and "action" not in form
    assert "name" not in token_input and token_input["type"] == "password"


def test_app_js_keeps_the_token_in_session_storage_and_sends_it_only_as_a_header() -> None:
    code = re.sub(r"^\s*//.*$", "", APP_JS, flags=re.MULTILINE)  # the comments may name things
    assert "sessionStorage.getItem(TOKEN_KEY)" in code
    assert "sessionStorage.setItem(TOKEN_KEY, token)" in code
    assert "localStorage" not in code and "document.cookie" not in code
    assert 'headers.Authorization = "Bearer " + token' in code
    assert not re.search(r"[?&]token=|access_token|\btoken\s*\+\s*[\"']&", code, re.IGNORECASE)
    # One place talks to the network, and it puts the token in a header, not the path.
    assert code.count("fetch(") == 1 and "fetch(API + path, {" in code
    assert "XMLHttpRequest" not in code and "EventSource" not in code
    assert "location.href =" not in code and "location.search" not in code


def test_app_js_puts_api_data_into_the_page_as_text_only() -> None:
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in APP_JS, sink
    assert "new Function" not in APP_JS and 'setAttribute("on' not in APP_JS


def test_the_ui_files_ship_as_package_data() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "cotune.orchestrator.api.ui" in config["packages"]  # a data-only folder, as lua/
    globs = config["package-data"]["cotune.orchestrator.api.ui"]
    files = sorted(p.name for p in UI.iterdir())
    assert files == ["app.js", "index.html", "style.css"]
    for name in files:
        assert any(fnmatch.fnmatch(name, g) for g in globs), f"{name} is left out of the wheel"
    assert status_page.FILES == UI  # what the editable install serves, too


def test_url_of_names_the_folder() -> None:
    assert status_page.url_of("http://127.0.0.1:8470") == "http://127.0.0.1:8470/ui/"
    assert status_page.url_of("http://h:1/") == "http://h:1/ui/"


def test_cotune_up_and_run_name_the_page_and_where_its_token_is(tmp_path: Path) -> None:
    from cotune.orchestrator.runtime.coordinator import print_service, status_page_hint
    from cotune.orchestrator.settings import Settings
    from rich.console import Console

    url = "http://127.0.0.1:8470"
    settings = Settings(home=tmp_path)
    hint = status_page_hint(url, settings)
    assert hint == f"{url}/ui/  (paste the admin token from {tmp_path / 'admin-token'})"
    from_env = status_page_hint(url, Settings(home=tmp_path, admin_token="cta_x"))
    assert "$COTUNE_ADMIN_TOKEN" in from_env and "cta_x" not in from_env

    console = Console(record=True, width=200, soft_wrap=True, highlight=False)
    service = SimpleNamespace(url=url, settings=settings, pool=None)
    print_service(console, service, tmp_path)  # type: ignore[arg-type]  # as `cotune up` does
    assert f"  status page  {hint}" in console.export_text().splitlines()
