"""Headless Chromium for the report tests and benchmarks: find it, load a page, return the DOM after its script ran.

Found through DSV4_CHROMIUM, then chromium-headless-shell, chromium, chromium-browser, google-chrome on PATH
(`.ci/run` installs Debian's chromium-headless-shell where apt-get can). Every network request the page makes is
sent to a local recording proxy (``--proxy-server``), so a test can assert that nothing asked for the network.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import threading
from pathlib import Path

NAMES = ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome")


def chromium_path() -> str | None:
    env = os.environ.get("DSV4_CHROMIUM")
    if env:
        return env if Path(env).exists() else None
    return next((p for p in map(shutil.which, NAMES) if p), None)


class RecordingProxy:
    """Accepts connections on 127.0.0.1 and records the first line of every request (then closes it)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.requests: list[str] = []
        self._t = threading.Thread(target=self._serve, daemon=True)
        self._t.start()

    def _serve(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            try:
                c.settimeout(2)
                data = c.recv(4096).decode(errors="replace")
                self.requests.append(data.splitlines()[0] if data else "(connection)")
            except OSError:
                self.requests.append("(connection)")
            finally:
                c.close()

    def close(self):
        self.sock.close()


def dump_dom(exe: str, page: Path, *, proxy: RecordingProxy | None = None, budget_ms: int = 5000,
             timeout: float = 60) -> str:
    """The serialized DOM of ``page`` after load and ``budget_ms`` of virtual time (scripts have run)."""
    with tempfile.TemporaryDirectory() as prof:
        cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", f"--user-data-dir={prof}",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--dump-dom"] + ([f"--virtual-time-budget={budget_ms}"] if budget_ms else [])
        if proxy is not None:
            cmd += [f"--proxy-server=http://127.0.0.1:{proxy.port}", "--proxy-bypass-list=<-loopback>"]
        p = subprocess.run(cmd + [Path(page).resolve().as_uri()], capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0 and not p.stdout:
        raise RuntimeError(f"{exe} exited {p.returncode}: {p.stderr[-1500:]}")
    return p.stdout


PROBE = """<script>
window.addEventListener('load', function () { setTimeout(function () {
  var d = document.createElement('div'); d.id = 'dsv4-probe';
  d.setAttribute('data-load-ms', String(performance.now()));
  d.setAttribute('data-resources', String(performance.getEntriesByType('resource').length));
  document.body.appendChild(d); }, 0); });
</script>"""


def with_script(page: Path, script: str, dest: Path) -> Path:
    """A copy of ``page`` with ``script`` (HTML) appended before </body>."""
    html = Path(page).read_text()
    i = html.rfind("</body>")
    dest.write_text(html[:i] + script + html[i:])
    return dest


def load_time(exe: str, page: Path, repeat: int = 3) -> dict:
    """Wall seconds for headless Chromium to load ``page`` and run its scripts (--dump-dom returns after the load
    event), minus the same for a blank page (the browser's own start), best of ``repeat``; plus the page's own
    performance.now() at its load handlers (under virtual time, so only indicative)."""
    import re
    import time

    def wall(pg):
        best = None
        for _ in range(repeat):
            t0 = time.perf_counter()
            dom = dump_dom(exe, pg, budget_ms=0, timeout=120)
            dt = time.perf_counter() - t0
            best = dt if best is None else min(best, dt)
        return best, dom

    with tempfile.TemporaryDirectory() as d:
        blank = Path(d) / "blank.html"
        blank.write_text("<!doctype html><html><body></body></html>")
        probe = with_script(page, PROBE, Path(d) / "probe.html")
        t_blank, _ = wall(blank)
        t_page, dom = wall(probe)
    m = re.search(r'data-load-ms="([0-9.]+)"', dom)
    return {"load_s": round(t_page - t_blank, 2), "browser_start_s": round(t_blank, 2),
            "page_performance_now_s": round(float(m.group(1)) / 1000, 2) if m else None}
