"""The try-it page in a real headless Chromium, driven over the Chrome DevTools protocol (a websocket,
through aiohttp: no extra dependency). Needs Debian's ``chromium``; without it the tests skip, or fail
when ``CI`` is set."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import re
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from classifier.engine import Engine
from classifier.paths import PACKAGED_BASE_NAME, default_base_model
from tests.support.serving import (  # noqa: F401 (fixtures)
    PNG,
    TOKEN,
    copy_registry,
    engine_config,
    reference,
    registry_template_fixture,
    running_server,
    tiny_base_fixture,
)

pytestmark = [pytest.mark.browser, pytest.mark.asyncio(loop_scope="module")]

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--remote-debugging-port=0",  # Chromium picks a free port and writes it to DevToolsActivePort
]


def chromium_path() -> str:
    path = os.environ.get("TRIAGE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        reason = "chromium is not installed (apt-get install chromium chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI is set, so the browser tests must run")
        pytest.skip(reason)
    return path


class DevTools:
    """A minimal CDP client for one page: commands by id, results as futures."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse):
        self.ws = ws
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for message in self.ws:
            data = json.loads(message.data)
            future = self._pending.pop(data.get("id", -1), None)
            if future is not None and not future.done():
                future.set_result(data)

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        call_id = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[call_id] = future
        await self.ws.send_json({"id": call_id, "method": method, "params": params})
        reply = await asyncio.wait_for(future, 15)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply["result"]

    async def evaluate(self, expression: str) -> Any:
        result = await self.send(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, within_s: float = 10) -> Any:
        deadline = asyncio.get_running_loop().time() + within_s
        while True:
            value = await self.evaluate(expression)
            if value:
                return value
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"timed out waiting for: {expression}")
            await asyncio.sleep(0.05)

    async def navigate(self, url: str) -> None:
        """Load ``url`` as a fresh document (from the same page, a new fragment alone would not reload)."""
        await self.send("Page.navigate", url="about:blank")
        await self.wait_for("location.href === 'about:blank'")
        await self.send("Page.navigate", url=url)
        page = re.split(r"[?#]", url)[0]
        await self.wait_for(
            f"location.href.startsWith({json.dumps(page)}) && document.readyState === 'complete'"
        )

    async def type_into(self, selector: str, text: str) -> None:
        """Focus the element and type, as a keyboard would (Input.insertText)."""
        await self.evaluate(f"document.querySelector({json.dumps(selector)}).focus()")
        await self.send("Input.insertText", text=text)

    async def click(self, selector: str) -> None:
        """A real mouse click at the element's centre."""
        box = await self.evaluate(
            f"(() => {{ const r = document.querySelector({json.dumps(selector)}).getBoundingClientRect();"
            " return {x: r.x + r.width / 2, y: r.y + r.height / 2}; })()"
        )
        for kind in ("mousePressed", "mouseReleased"):
            await self.send(
                "Input.dispatchMouseEvent", type=kind, x=box["x"], y=box["y"], button="left", clickCount=1
            )

    async def close(self) -> None:
        await self.ws.close()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


CHROMIUM_START_S = 120.0  # a cold first start on a busy 2-core CI machine took over 15 s


def written_port(port_file: Path) -> int | None:
    text = port_file.read_text() if port_file.is_file() else ""
    return int(text.split()[0]) if text.strip() else None


def log_tail(log: Path) -> str:
    return log.read_text(errors="replace")[-2000:]


async def devtools_port(port_file: Path, process: asyncio.subprocess.Process, log: Path) -> int:
    """Wait until Chromium writes its DevTools port, or say why it never did."""
    deadline = time.monotonic() + CHROMIUM_START_S
    while (port := await asyncio.to_thread(written_port, port_file)) is None:
        if process.returncode is not None:
            tail = await asyncio.to_thread(log_tail, log)
            pytest.fail(f"chromium exited with {process.returncode}: {tail}")
        if time.monotonic() > deadline:
            tail = await asyncio.to_thread(log_tail, log)
            pytest.fail(f"chromium wrote no DevTools port in {CHROMIUM_START_S:.0f} s: {tail}")
        await asyncio.sleep(0.05)
    return port


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[DevTools]:
    executable = chromium_path()
    profile = tmp_path_factory.mktemp("chromium-profile")
    log = (profile.parent / "chromium.log").open("wb")
    process = await asyncio.create_subprocess_exec(
        executable, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank", stdout=log, stderr=log
    )
    try:
        port = await devtools_port(profile / "DevToolsActivePort", process, Path(log.name))
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/json/list") as r:
                targets = await r.json()
            page = next(t for t in targets if t["type"] == "page")
            async with http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                tools = DevTools(ws)
                await tools.send("Page.enable")
                await tools.send("Runtime.enable")
                yield tools
                await tools.close()
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 10)
            except TimeoutError:
                process.kill()
                await process.wait()
        log.close()


METRICS = {  # the shape of version.json's metrics: evaluate.summary(report)["heads"]
    "topic": {"n": 40, "accuracy": 0.9, "macro_f1": 0.825, "macro_recall": 0.8, "roc_auc": None, "ece": 0.05},
    "urgency": {
        "n": 40,
        "accuracy": 0.75,
        "macro_f1": 0.6,
        "macro_recall": 0.625,
        "roc_auc": 0.9,
        "ece": 0.125,
    },
}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def page_server(
    tmp_path_factory: pytest.TempPathFactory, registry_template: Path
) -> AsyncIterator[Any]:
    """A server whose v1 was trained on the packaged base model, with evaluation metrics (as training
    records them: per head) and a confusion-matrix PNG."""
    registry = copy_registry(registry_template, tmp_path_factory.mktemp("page") / "models")
    version_dir = Path(registry.get("v1").path)
    (version_dir / "eval").mkdir()
    (version_dir / "eval" / "confusion_topic.png").write_bytes(PNG)
    registry.update_metrics("v1", METRICS)
    recorded = json.loads((version_dir / "version.json").read_text(encoding="utf-8"))
    recorded["base_model"] = str(default_base_model())  # as `triage train` records the default
    (version_dir / "version.json").write_text(json.dumps(recorded), encoding="utf-8")
    engine = Engine(registry, engine_config())
    async with running_server(engine) as url:
        yield url, registry


async def test_type_a_message_click_and_read_each_heads_result(browser: DevTools, page_server: Any) -> None:
    url, registry = page_server
    message = "We were charged twice for our subscription this month, please refund"
    expected = reference(registry, "v1", [message])[0]["heads"]

    await browser.navigate(f"{url}/#token={TOKEN}")
    # The token moved from the URL's fragment (never sent to the server) into this tab's sessionStorage
    # and the password field.
    assert await browser.evaluate("location.hash") == ""
    assert await browser.evaluate("location.href") == f"{url}/"
    assert await browser.evaluate("sessionStorage.getItem('triage.classifier.token')") == TOKEN
    assert await browser.evaluate("document.getElementById('token').type") == "password"
    # Model version, base model, evaluation metrics and the confusion matrix (fetched with the token,
    # shown as a blob).
    await browser.wait_for("document.getElementById('version').textContent === 'v1'")
    meta = await browser.evaluate("document.getElementById('model-meta').textContent")
    assert f"base {PACKAGED_BASE_NAME}" in meta
    table = await browser.evaluate(
        "[...document.querySelectorAll('#metrics table tr')]"
        ".map(row => [...row.children].map(cell => cell.textContent))"
    )
    assert table == [
        ["head", "n", "accuracy", "macro f1", "macro recall", "roc auc", "ece"],
        ["topic", "40", "0.900", "0.825", "0.800", "–", "0.050"],
        ["urgency", "40", "0.750", "0.600", "0.625", "0.900", "0.125"],
    ]
    assert "No evaluation recorded" not in await browser.evaluate(
        "document.getElementById('metrics').textContent"
    )
    await browser.wait_for("(document.querySelector('#eval-images img') || {}).naturalWidth > 0")

    await browser.type_into("#text", message)
    await browser.click("#classify")
    await browser.wait_for("document.querySelectorAll('#results .head').length > 0")
    shown = await browser.evaluate(
        "[...document.querySelectorAll('#results .head')].map(h => ({head: h.dataset.head,"
        " label: h.querySelector('.label').textContent,"
        " confidence: h.querySelector('.confidence').textContent,"
        " bars: h.querySelectorAll('.bar-row').length,"
        " top: h.querySelector('.bar-row.top .bar-label').textContent,"
        " width: h.querySelector('.bar-row.top .fill').style.width}))"
    )
    assert await browser.evaluate("document.getElementById('result-version').dataset.version") == "v1"
    assert [s["head"] for s in shown] == list(expected)
    for item in shown:
        prediction = expected[item["head"]]
        assert item["label"] == item["top"] == prediction.label
        assert item["confidence"].strip() == f"{prediction.confidence * 100:.1f}%"
        assert item["bars"] == len(prediction.scores)
        assert float(item["width"].rstrip("%")) == pytest.approx(prediction.confidence * 100, abs=0.01)


async def test_a_wrong_token_shows_an_error_instead_of_results(browser: DevTools, page_server: Any) -> None:
    url, _ = page_server
    await browser.navigate(f"{url}/#token=not-the-right-token-at-all")
    await browser.wait_for("document.getElementById('model-meta').textContent.includes('rejected')")
    await browser.type_into("#text", "hello")
    await browser.click("#classify")
    status = await browser.wait_for(
        "document.getElementById('status').textContent.includes('rejected') && "
        "document.getElementById('status').textContent"
    )
    assert "Token missing or rejected" in status
    assert await browser.evaluate("document.getElementById('results').hidden") is True

    # A second link with the right token, opened in the same tab (only the fragment changes).
    await browser.evaluate(f"location.hash = 'token={TOKEN}'")
    await browser.wait_for("document.getElementById('version').textContent === 'v1'")
    assert await browser.evaluate("location.hash") == ""
    assert await browser.evaluate("document.getElementById('token').value") == TOKEN
