"""Headless Chromium for tests, driven over the DevTools protocol on a pipe (no extra package).

    with Chromium.launch(tmp_path / "chromium") as browser:
        page = browser.new_page(1280, 900)
        page.goto("http://127.0.0.1:8470/ui/")
        page.evaluate("sessionStorage.setItem('k', 'v')")
        page.wait_until("document.querySelector('#jobs tr') !== null", timeout_s=30)
        html = page.html()                       # document.documentElement.outerHTML
        page.screenshot(Path("page.png"))        # the whole page, as PNG

`--remote-debugging-pipe` makes Chromium read protocol messages (JSON, each ended by a NUL
byte) on its fd 3 and write answers and events on its fd 4; `/bin/sh` puts the two pipes
there, so nothing listens on a port. The flags suit a closed network: no GPU, no sandbox
(containers), no background, component or sync traffic. `chromium_binary()` is None where
no Chromium is installed; tests skip on that.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",  # a container's /dev/shm is often too small for the renderer
    "--no-first-run",
    "--no-default-browser-check",
    "--hide-scrollbars",
    "--mute-audio",
    "--remote-debugging-pipe",
)
# Chromium's fd 3 is the pipe it reads, fd 4 the one it writes; its stdout goes to the log.
_PIPES_TO_FD_3_AND_4 = 'exec "$0" "$@" 3<&0 4>&1 </dev/null >&2'


def chromium_binary() -> str | None:
    """The Chromium to run: $COTUNE_TEST_CHROMIUM, else the first of the usual names on PATH."""
    given = os.environ.get("COTUNE_TEST_CHROMIUM")
    if given:
        return given if shutil.which(given) else None
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


class BrowserError(RuntimeError):
    """The browser answered a command with an error, died, or did not answer in time."""


class Chromium:
    """One headless Chromium process and its DevTools pipe; see the module docstring."""

    def __init__(
        self, proc: subprocess.Popen[bytes], to_browser: int, from_browser: int, log_path: Path
    ) -> None:
        self.proc = proc
        self.log_path = log_path
        self._out = to_browser
        self._in = from_browser
        self._buffer = b""
        self._next_id = 0
        self._events: list[dict[str, Any]] = []

    @classmethod
    def launch(cls, folder: Path, binary: str | None = None) -> Chromium:
        """Start Chromium with a fresh profile under `folder` (its log is folder/chromium.log)."""
        binary = binary or chromium_binary()
        if binary is None:
            raise BrowserError("no Chromium found: install chromium or set COTUNE_TEST_CHROMIUM")
        folder.mkdir(parents=True, exist_ok=True)
        log_path = folder / "chromium.log"
        browser_reads, to_browser = os.pipe()
        from_browser, browser_writes = os.pipe()
        argv = [*FLAGS, f"--user-data-dir={folder / 'profile'}", "about:blank"]
        with log_path.open("ab") as log:
            proc = subprocess.Popen(
                ["/bin/sh", "-c", _PIPES_TO_FD_3_AND_4, binary, *argv],
                stdin=browser_reads,
                stdout=browser_writes,
                stderr=log,
                start_new_session=True,  # its zygote and renderers go with it on close()
            )
        os.close(browser_reads)
        os.close(browser_writes)
        return cls(proc, to_browser, from_browser, log_path)

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        *,
        session: str | None = None,
        timeout_s: float = 30.0,
    ) -> dict[str, Any]:
        """Send one protocol command (to a page's `session`, else the browser); its result."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        os.write(self._out, json.dumps(message).encode() + b"\0")
        give_up_at = time.monotonic() + timeout_s
        while True:
            answer = self._receive(give_up_at, method)
            if answer.get("id") != self._next_id:
                self._events.append(answer)  # an event (or an answer nobody waits for)
                continue
            if "error" in answer:
                raise BrowserError(f"{method}: {answer['error'].get('message', answer['error'])}")
            result: dict[str, Any] = answer.get("result", {})
            return result

    def _receive(self, give_up_at: float, waiting_for: str) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            left = give_up_at - time.monotonic()
            if left <= 0:
                raise BrowserError(f"{waiting_for}: no answer from Chromium in time")
            ready, _, _ = select.select([self._in], [], [], left)
            if not ready:
                continue
            chunk = os.read(self._in, 1 << 20)
            if not chunk:
                raise BrowserError(f"{waiting_for}: Chromium exited; see {self.log_path}")
            self._buffer += chunk
        message, _, self._buffer = self._buffer.partition(b"\0")
        found: dict[str, Any] = json.loads(message)
        return found

    def new_page(self, width: int = 1280, height: int = 900) -> Page:
        """A new tab of that viewport, attached (its commands go to its own session)."""
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        attached = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})
        page = Page(self, attached["sessionId"])
        page.call("Page.enable")
        page.call("Runtime.enable")
        page.call(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
        )
        return page

    def close(self, timeout_s: float = 10.0) -> None:
        """Close the browser (politely, then by SIGKILL of its whole process group)."""
        if self.proc.poll() is None:
            with contextlib.suppress(BrowserError, OSError):
                self.call("Browser.close", timeout_s=timeout_s)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout_s)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # renderers left behind, if any
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout_s)
        for fd in (self._out, self._in):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._out = self._in = -1


class Page:
    """One tab: navigate, run JavaScript, wait for a condition, dump the DOM, screenshot."""

    def __init__(self, browser: Chromium, session: str) -> None:
        self.browser = browser
        self.session = session

    def call(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return self.browser.call(method, params, session=self.session)

    def goto(self, url: str, timeout_s: float = 30.0) -> None:
        """Load `url` and wait until its document has loaded."""
        answer = self.call("Page.navigate", {"url": url})
        if answer.get("errorText"):
            raise BrowserError(f"loading {url}: {answer['errorText']}")
        self.wait_until("document.readyState === 'complete'", timeout_s, what=f"{url} to load")

    def reload(self, timeout_s: float = 30.0) -> None:
        self.call("Page.reload", {"ignoreCache": True})
        time.sleep(0.2)  # let the old document go before asking the new one
        self.wait_until("document.readyState === 'complete'", timeout_s, what="the reload")

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (promises awaited)."""
        answer = self.call(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
        )
        if "exceptionDetails" in answer:
            details = answer["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise BrowserError(f"{expression!r} threw: {text}")
        return answer["result"].get("value")

    def wait_until(
        self, expression: str, timeout_s: float, *, what: str | None = None, every_s: float = 0.25
    ) -> Any:
        """The expression's value once it is truthy; BrowserError after `timeout_s`.

        Values come back as JSON: an element arrives as `{}`, which Python finds false, so
        ask for `!!document.querySelector(...)`, not the element.
        """
        give_up_at = time.monotonic() + timeout_s
        while True:
            with contextlib.suppress(BrowserError):  # a navigation in between: ask again
                value = self.evaluate(expression)
                if value:
                    return value
            if time.monotonic() > give_up_at:
                raise BrowserError(
                    f"timed out after {timeout_s:.0f} s waiting for {what or expression}"
                )
            time.sleep(every_s)

    def html(self) -> str:
        """The rendered DOM as HTML (document.documentElement.outerHTML)."""
        return str(self.evaluate("document.documentElement.outerHTML"))

    def screenshot(self, path: Path) -> Path:
        """A PNG of the whole page (beyond the viewport) at `path`."""
        size = self.call("Page.getLayoutMetrics")["cssContentSize"]
        clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
        shot = self.call(
            "Page.captureScreenshot",
            {"format": "png", "clip": clip, "captureBeyondViewport": True},
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(shot["data"]))
        return path
