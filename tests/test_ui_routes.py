"""The dashboard's routes (``/ui``, ``/ui/``, ``/ui/NAME``) and its files: served, public, relative, shipped."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from html.parser import HTMLParser
from importlib import resources
from pathlib import Path

import pytest

from smart_proxy.handlers.ui_routes import ASSETS

from .test_ops import with_proxy

UI = resources.files("smart_proxy").joinpath("ui")
ROOT = Path(__file__).parent.parent


async def test_the_page_and_its_files_are_served_without_a_key(make_config, start_proxy, http) -> None:
    url = await start_proxy(with_proxy(make_config({"a": {}}), api_keys=("sk-one",)))
    for name, content_type in ASSETS.items():
        response = await http.get(f"{url}/ui/{name}")
        assert response.status_code == 200, (name, response.text)
        assert response.headers["content-type"] == content_type
        assert response.headers["x-content-type-options"] == "nosniff"
        assert "default-src 'self'" in response.headers["content-security-policy"]
        assert response.content == UI.joinpath(name).read_bytes()
    page = await http.get(url + "/ui/")
    assert page.status_code == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
    assert page.content == UI.joinpath("index.html").read_bytes()
    # what the page reads needs the key, as always
    assert (await http.get(url + "/events")).status_code == 401
    assert (await http.get(url + "/v1/models")).status_code == 401


async def test_ui_without_a_slash_redirects_relatively(make_config, start_proxy, http) -> None:
    """``/ui`` -> ``ui/``: a relative Location, so ``/llm/ui`` behind a proxy goes to ``/llm/ui/``."""
    url = await start_proxy(make_config({"a": {}}))
    response = await http.get(url + "/ui")
    assert response.status_code == 308 and response.headers["location"] == "ui/"
    followed = await http.get(url + "/ui", follow_redirects=True)
    assert followed.status_code == 200 and str(followed.url) == url + "/ui/"


@pytest.mark.parametrize("name", ["nope.js", "index.htm", "..%2f..%2fpyproject.toml", "ui/app.js", "App.js", "%00"])
async def test_any_other_name_is_a_404_in_openai_shape(make_config, start_proxy, http, name: str) -> None:
    url = await start_proxy(with_proxy(make_config({"a": {}}), api_keys=("sk-one",)))
    response = await http.get(f"{url}/ui/{name}")
    assert response.status_code == 404, response.text
    error = response.json()["error"]
    assert error["code"] == 404 and error["type"] and "ui/" in error["message"]


async def test_other_methods_are_refused(make_config, start_proxy, http) -> None:
    url = await start_proxy(make_config({"a": {}}))
    response = await http.post(url + "/ui/app.js", content=b"x")
    assert response.status_code == 405 and response.json()["error"]["code"] == 405


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [value or "" for name, value in attrs if name in ("src", "href", "action", "formaction")]


def test_every_url_in_the_page_is_relative() -> None:
    """A URL that starts with ``/`` or names a host breaks the page behind a proxy at a sub-path (or offline)."""
    parser = _Links()
    parser.feed(UI.joinpath("index.html").read_text())
    assert sorted(parser.urls) == ["app.css", "app.js"]
    script = UI.joinpath("app.js").read_text()
    code = re.sub(r"^\s*//.*$", "", script, flags=re.M)  # comments may say what they like
    absolute = re.findall(r"""["'`](?:/|https?:|//)[^"'`]*["'`]""", code)
    assert absolute == []
    assert "EventSource" not in code  # it cannot send the API key
    css = UI.joinpath("app.css").read_text()
    assert "url(" not in css and "@import" not in css


def test_the_page_calls_routes_that_exist() -> None:
    """The paths the script calls (relative to the proxy's root) are routes of the proxy."""
    from smart_proxy.web.app import _ROUTES
    from smart_proxy.web.routes import ROUTES

    script = UI.joinpath("app.js").read_text()
    called = set(re.findall(r"""(?:call|post)\(\s*[`"']([a-z0-9/_.-]+)""", script))
    assert called == {"events", "v1/models", "api/generate", "api/pull", "v1/chat/completions", "logs/"}
    known = {rule for rule, _methods, _view in _ROUTES} | set(ROUTES)
    for path in called:
        assert "/" + path in known or "/" + path + "<path:model>" in known, path


def test_the_wheel_ships_the_dashboard(tmp_path: Path) -> None:
    """pyproject.toml's package-data puts the page, script and style sheet in the wheel (built from a copy of the tree)."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "smart_proxy", source / "smart_proxy", ignore=shutil.ignore_patterns("__pycache__"))
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path / "dist"), str(source)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr[-2000:]
    [wheel] = (tmp_path / "dist").glob("smart_proxy-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"smart_proxy/ui/{name}" for name in ASSETS} <= names
    assert "smart_proxy/handlers/ui_routes.py" in names
