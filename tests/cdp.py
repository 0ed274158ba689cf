"""A minimal Chrome DevTools Protocol client over `--remote-debugging-pipe`, for headless browser tests.

Debian's `chromium` is the only browser here (no download of another is possible), and the
environment has no websocket client: the pipe transport needs none (JSON messages ending in a NUL
byte, commands on the browser's fd 3, answers and events on its fd 4).

    with Browser() as b:
        b.open("http://127.0.0.1:8765/")
        b.screenshot(path)
        b.click("button[value=first]")
"""
from __future__ import annotations

import base64
import fcntl
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

CHROMIUM = shutil.which("chromium")


def _as_fds_3_and_4(read_end: int, write_end: int) -> None:
    """In the child, before exec: the pipe ends as fds 3 and 4 (via fds >= 10 first, so that neither
    dup2 overwrites the other end). pass_fds=(3, 4) keeps them past Popen's closing of the rest."""
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (read_end, write_end)]
    os.dup2(high[0], 3)
    os.dup2(high[1], 4)


class Browser:
    def __init__(self, width: int = 1200, height: int = 900, timeout: float = 60.0):
        self.timeout, self._id, self._events = timeout, 0, []
        self._profile = tempfile.mkdtemp(prefix="cai-chromium-")
        to_browser, self._w = os.pipe()
        self._r, from_browser = os.pipe()
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--remote-debugging-pipe",
             f"--user-data-dir={self._profile}", f"--window-size={width},{height}", "about:blank"],
            pass_fds=(3, 4), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=lambda: _as_fds_3_and_4(to_browser, from_browser))
        os.close(to_browser), os.close(from_browser)
        self._buf = b""
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.send("Page.enable", session=True)

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        os.close(self._w), os.close(self._r)
        shutil.rmtree(self._profile, ignore_errors=True)

    def _read(self) -> dict:
        while b"\0" not in self._buf:
            chunk = os.read(self._r, 1 << 16)
            if not chunk:
                raise RuntimeError("chromium closed the DevTools pipe")
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def send(self, method: str, session: bool = False, **params) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params}
        if session:
            msg["sessionId"] = self.session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        while True:
            reply = self._read()
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self._events.append(reply)

    def wait_load(self) -> None:
        """Until the page's next load event (a navigation, a form's POST -> redirect -> GET)."""
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            while self._events:
                if self._events.pop(0).get("method") == "Page.loadEventFired":
                    return
            self._events.append(self._read())
        raise TimeoutError("the page did not load")

    def open(self, url: str) -> None:
        self._events.clear()
        self.send("Page.navigate", session=True, url=url)
        self.wait_load()

    def js(self, expression: str):
        reply = self.send("Runtime.evaluate", session=True, expression=expression, returnByValue=True)
        if "exceptionDetails" in reply:
            raise RuntimeError(f"{expression}: {reply['exceptionDetails'].get('exception', {}).get('description')}")
        return reply["result"].get("value")

    def click(self, selector: str) -> None:
        """A real mouse click (press and release) at the centre of the element, then the load it causes."""
        box = self.js(f"(() => {{ const r = document.querySelector({json.dumps(selector)}).getBoundingClientRect();"
                      " return [r.x + r.width / 2, r.y + r.height / 2]; })()")
        self._events.clear()
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", session=True, type=kind, x=box[0], y=box[1], button="left",
                      clickCount=1)
        self.wait_load()

    def press_enter(self, selector: str) -> None:
        """Keyboard: focus the element, then a real Enter key press, and the load it causes."""
        self.js(f"document.querySelector({json.dumps(selector)}).focus()")
        self._events.clear()
        for kind in ("keyDown", "keyUp"):
            self.send("Input.dispatchKeyEvent", session=True, type=kind, key="Enter", code="Enter",
                      windowsVirtualKeyCode=13, **({"text": "\r"} if kind == "keyDown" else {}))
        self.wait_load()

    def screenshot(self, path: Path, full_page: bool = False) -> Path:
        """A PNG of the window, or of the whole page however long (full_page: the layout's content size)."""
        extra = {}
        if full_page:
            size = self.send("Page.getLayoutMetrics", session=True)["cssContentSize"]
            extra = {"captureBeyondViewport": True,
                     "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}}
        data = self.send("Page.captureScreenshot", session=True, format="png", **extra)["data"]
        path.write_bytes(base64.b64decode(data))
        return path
