"""The explorer notebook in a real browser: JupyterLab on localhost (temporary config, autosave
off) runs notebooks/05_explore_circuits.ipynb in headless Chromium; the explorer's graph must be
drawn on a canvas of nonzero size (and the graph the notebook draws before it, and the
standalone page of a circuit), a mouse click on a node must fill the node pane (a round trip
through the kernel), the k slider moved with the keyboard must redraw the graph with one node
fewer and change the loss line, switching to the dense model and choosing another task in the
dropdowns must redraw it, and no request may leave localhost. Screenshots go to test-artifacts/.

Needs Debian's chromium at /usr/bin/chromium (Playwright's own browser download is not used);
.ci/run installs it.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import pytest
from conftest import REPO

NOTEBOOK = REPO / "notebooks" / "05_explore_circuits.ipynb"
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = Path("/usr/bin/chromium")
# On idle cores JupyterLab starts in seconds and the notebook runs in under 2 minutes; busy cores
# make both many times slower, hence the generous limits (CSPKIT_BROWSER_TIMEOUT, in seconds).
NOTEBOOK_TIMEOUT_S = float(os.environ.get("CSPKIT_BROWSER_TIMEOUT", 900))
START_TIMEOUT_S = 300

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason=(
    f"the browser test needs Debian's chromium at {CHROMIUM}: `apt-get install -y chromium` "
    "(.ci/run installs it)"))

# Every code cell has run, none failed, and the kernel is idle: "done", "error: ..." or false.
_NOTEBOOK_STATE = """() => {
  const panel = window.jupyterapp.shell.currentWidget;
  const kernel = panel && panel.sessionContext.session && panel.sessionContext.session.kernel;
  if (!kernel) return false;
  const cells = panel.content.model.cells;
  for (let i = 0; i < cells.length; i++) {
    const cell = cells.get(i);
    if (cell.type !== "code") continue;
    for (const out of cell.toJSON().outputs) {
      if (out.output_type === "error") return "error: " + out.ename + ": " + out.evalue;
    }
    if (cell.executionCount == null) return false;
  }
  return kernel.status === "idle" ? "done" : false;
}"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _settings(root: Path) -> Path:
    """JupyterLab user settings: no autosave (the notebook file must not change), no news or
    update checks, every cell kept in the page (no windowing of off-screen cells)."""
    d = root / "settings"
    for plugin, value in [("@jupyterlab/docmanager-extension/plugin", {"autosave": False}),
                          ("@jupyterlab/apputils-extension/notification",
                           {"fetchNews": "false", "checkForUpdates": False}),
                          ("@jupyterlab/notebook-extension/tracker", {"windowingMode": "none"})]:
        f = d / f"{plugin}.jupyterlab-settings"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps(value))
    return d


def _start_lab(tmp: Path, port: int, token: str) -> subprocess.Popen:
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(tmp / "config"), "JUPYTER_RUNTIME_DIR": str(tmp / "runtime"),
           "IPYTHONDIR": str(tmp / "ipython")}
    cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ServerApp.ip=127.0.0.1",
           f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
           f"--ServerApp.root_dir={NOTEBOOK.parent}", f"--LabApp.user_settings_dir={_settings(tmp)}",
           f"--LabApp.workspaces_dir={tmp / 'workspaces'}", "--LabApp.expose_app_in_browser=True"]
    if os.geteuid() == 0:
        cmd.append("--allow-root")
    log = open(tmp / "jupyterlab.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + START_TIMEOUT_S
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"JupyterLab exited with {proc.returncode}: {(tmp / 'jupyterlab.log').read_text()}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status?token={token}", timeout=2)
            return proc
        except OSError:
            time.sleep(0.5)
    _stop(proc)
    raise RuntimeError(f"JupyterLab did not answer within {START_TIMEOUT_S} s: {(tmp / 'jupyterlab.log').read_text()}")


def _stop(proc: subprocess.Popen) -> None:
    """Stop the server and the kernel it started (the process group this test created)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _frame_canvas(frame) -> dict:
    """The canvas's size and how many of its pixels are painted, in a graph page (iframe)."""
    return frame.evaluate(_PAINTED, "#mynetwork canvas")


_PAINTED = """sel => {
  const c = typeof sel === "string" ? document.querySelector(sel) : sel;
  const r = c.getBoundingClientRect();
  const px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let painted = 0;
  for (let i = 0; i < px.length; i += 4)
    if (px[i + 3] > 0 && (px[i] < 240 || px[i + 1] < 240 || px[i + 2] < 240)) painted++;
  return {width: c.width, height: c.height, shown_width: r.width, shown_height: r.height, painted: painted};
}"""

# the first graph widget outside the explorer (the box its canvas is drawn in)
_PLAIN = "[...document.querySelectorAll('.cspkit-graph-canvas')].find(b => !b.closest('.cspkit-explorer'))"


def _graph_page(path: Path) -> Path:
    """The quote circuit's standalone page (inlined vis-network, a CSP that allows nothing remote)."""
    import cspkit
    from cspkit.circuit import Circuit
    model = cspkit.load("small-sparse")
    circuit = Circuit.load(REPO / "results" / "circuits" / "small-sparse" / "single_double_quote.json", model=model)
    return cspkit.circuit_graph(circuit, n_pairs=4).write_html(path)


# the explorer's graph widget once it has drawn ``n`` nodes
_GRAPH = ".cspkit-explorer .cspkit-graph"


def _explorer_graph(page, n: int | None = None) -> dict:
    cond = "" if n is None else f" && g.dataset.nodes === '{n}'"
    page.wait_for_function(f"() => {{ const g = document.querySelector('{_GRAPH}');"
                           f" return g && g.dataset.drawn{cond}; }}", timeout=120_000)
    page.query_selector(_GRAPH).scroll_into_view_if_needed()
    return page.evaluate(_PAINTED, f"{_GRAPH} canvas")


def _choose(page, select: str, value: str, n: int) -> dict:
    """Choose ``value`` in a dropdown of the explorer and wait for a graph other than the one of
    ``n`` nodes to be drawn."""
    page.select_option(select, value)
    page.wait_for_function(f"() => document.querySelector('{_GRAPH}').dataset.nodes !== '{n}'", timeout=120_000)
    return _explorer_graph(page)


def test_explorer_notebook_draws_offline_in_jupyterlab(tmp_path):
    from playwright.sync_api import sync_playwright

    before = hashlib.sha256(NOTEBOOK.read_bytes()).hexdigest()
    ARTIFACTS.mkdir(exist_ok=True)
    port, token = _free_port(), os.urandom(16).hex()
    start = time.time()
    proc = _start_lab(tmp_path, port, token)
    requests, sockets, graph_errors = [], [], []
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM),
                                         args=["--no-sandbox"] if os.geteuid() == 0 else [])
            context = browser.new_context(viewport={"width": 1400, "height": 1000})
            context.on("request", lambda r: requests.append(r.url))
            page = context.new_page()
            page.on("websocket", lambda ws: sockets.append(ws.url))
            # errors inside the graph pages (srcdoc iframes): a blocked script (CSP) or a JS exception
            page.on("console", lambda m: graph_errors.append(m.text)
                    if m.type == "error" and m.location.get("url", "").startswith("about:srcdoc") else None)
            page.goto(f"http://127.0.0.1:{port}/lab/tree/{NOTEBOOK.name}?token={token}")
            page.wait_for_function("() => window.jupyterapp && window.jupyterapp.shell.currentWidget && "
                                   "window.jupyterapp.shell.currentWidget.sessionContext.session && "
                                   "window.jupyterapp.shell.currentWidget.sessionContext.session.kernel && "
                                   "window.jupyterapp.shell.currentWidget.sessionContext.session.kernel.status "
                                   "=== 'idle'", timeout=120_000)
            page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
            state = page.wait_for_function(_NOTEBOOK_STATE, timeout=NOTEBOOK_TIMEOUT_S * 1000).json_value()
            assert state == "done", state
            ran = time.time() - start

            # the graph the notebook draws directly (viz.GraphWidget, outside the explorer)
            page.wait_for_function(f"() => {{ const b = {_PLAIN}; return b && b.parentElement.dataset.drawn; }}",
                                   timeout=60_000)
            plain = page.evaluate_handle(f"() => {_PLAIN}.querySelector('canvas')")
            plain.scroll_into_view_if_needed()
            page.screenshot(path=str(ARTIFACTS / "notebook-graph.png"))
            direct = page.evaluate(_PAINTED, plain)
            assert direct["width"] > 0 and direct["height"] > 0 and direct["painted"] > 1000, direct

            first = _explorer_graph(page)
            page.screenshot(path=str(ARTIFACTS / "explorer-quote.png"))
            assert first["width"] > 0 and first["height"] > 0 and first["shown_width"] > 0, first
            assert first["painted"] > 1000, first
            n = int(page.eval_on_selector(_GRAPH, "g => g.dataset.nodes"))

            # a real click on a node of the drawing selects it in Python: the node pane shows it
            spot = page.eval_on_selector(_GRAPH, """g => {
              const net = g.cspkitNetwork, id = net.body.data.nodes.getIds()[0];
              const p = net.canvasToDOM(net.getPositions([id])[id]);
              const r = g.querySelector('canvas').getBoundingClientRect();
              return {id: id, x: r.left + p.x, y: r.top + p.y};
            }""")
            page.mouse.click(spot["x"], spot["y"])
            page.wait_for_function("id => { const d = document.querySelector('.cspkit-details');"
                                   " return d && d.textContent.includes(id) && d.textContent.includes('class A'); }",
                                   arg=spot["id"], timeout=60_000)
            page.screenshot(path=str(ARTIFACTS / "explorer-node.png"))

            # the k slider, moved one step down with the keyboard: one node fewer, another loss
            loss_before = page.inner_text(".cspkit-loss")
            page.click(".cspkit-k .noUi-handle")
            page.keyboard.press("ArrowLeft")
            _explorer_graph(page, n - 1)
            page.wait_for_function("t => document.querySelector('.cspkit-loss').innerText !== t", arg=loss_before,
                                   timeout=60_000)
            page.screenshot(path=str(ARTIFACTS / "explorer-k.png"))
            page.keyboard.press("ArrowRight")
            _explorer_graph(page, n)

            # another model: its circuit of the same task replaces the graph, and back
            dense = _choose(page, ".cspkit-model select", "small-dense", n)
            page.screenshot(path=str(ARTIFACTS / "explorer-dense.png"))
            assert dense["painted"] > 1000, dense
            page.select_option(".cspkit-model select", "small-sparse")
            _explorer_graph(page, n)

            second = _choose(page, ".cspkit-task select", "bracket_counting", n)
            page.screenshot(path=str(ARTIFACTS / "explorer-bracket_counting.png"))
            assert second["width"] > 0 and second["height"] > 0 and second["painted"] > 1000, second

            # the standalone page (write_html), as net.show() puts it in a sandboxed iframe
            standalone = context.new_page()
            standalone.on("console", lambda m: graph_errors.append(m.text) if m.type == "error" else None)
            standalone.goto(_graph_page(tmp_path / "quote.html").as_uri())
            standalone.wait_for_selector("body[data-drawn='1']", state="attached", timeout=60_000)
            standalone.screenshot(path=str(ARTIFACTS / "standalone-graph.png"))
            page_drawn = _frame_canvas(standalone.main_frame)
            assert page_drawn["width"] > 0 and page_drawn["painted"] > 1000, page_drawn
            browser.close()
    finally:
        _stop(proc)
    local = {"127.0.0.1", "localhost"}
    away = [u for u in requests + sockets
            if urlparse(u).scheme not in ("data", "blob", "about", "file") and urlparse(u).hostname not in local]
    assert not away, away
    assert not graph_errors, graph_errors
    assert hashlib.sha256(NOTEBOOK.read_bytes()).hexdigest() == before, "the test changed the notebook file"
    print(f"notebook ran in JupyterLab in {ran:.0f} s; {len(requests)} requests, all to localhost")
