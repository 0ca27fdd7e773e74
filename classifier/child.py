"""The classifier server (``classifier.server.serve``) in a child process: the bot's embedded default.

In one process the engine's threads compete with the bot's event loop for the GIL and the cores, and
acknowledgements slow down under load. So without ``CLASSIFIER_URL`` the bot (and ``triage up``) starts
this child and talks to it over loopback HTTP (``HttpClassifier``), like to any ``triage serve``::

    parent ──stdin: one JSON line (settings, tokens)──────────────────────▶ child: serve() on host:port
    parent ◀──stdout: {"listening": port}, then {"ready": version} or {"error": "one line"}── child
    parent closes stdin, or dies ──▶ the child reads end of input: it drains and exits

Tokens travel on stdin, never in argv or the environment. The child runs in its own session, so a Ctrl-C
in the terminal reaches only the parent, which stops the child after the bot has drained its own work; and
end of input stops a child whose parent was killed outright, so none is left behind. Every other setting
comes from the environment (``CLASSIFIER_DEVICE``, ``CLASSIFIER_POLL_INTERVAL_S``, ...), as for
``triage serve``; the child follows the registry's ACTIVE pointer the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import threading
from pathlib import Path
from typing import Any

from classifier.results import ClassifierUnavailable

log = logging.getLogger(__name__)

PACKAGE_ROOT = Path(__file__).resolve().parent.parent  # the folder holding `classifier`: the child imports it
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [classifier process]: %(message)s"


class ClassifierStartError(ClassifierUnavailable):
    """The classifier process did not start; ``str()`` is one line saying why."""


def spare_core_threads() -> int:
    """Torch threads that leave one core to the bot's event loop (at least one)."""
    return max(1, (os.cpu_count() or 2) - 1)


class ClassifierProcess:
    """One ``serve()`` in a child process. ``start()`` returns the bound port, ``ready()`` the version once
    the model is loaded (both raise ClassifierStartError), ``stop()`` drains it and waits for its exit."""

    def __init__(
        self,
        *,
        token: str,
        admin_token: str | None,
        host: str = "127.0.0.1",
        port: int = 0,
        registry_root: Path | None = None,
        cpu_threads: int | None = None,
        start_timeout_s: float = 300.0,
        stop_timeout_s: float = 30.0,
    ):
        self.token = token
        self.admin_token = admin_token
        self.host = host
        self.port = port
        self.registry_root = registry_root
        self.cpu_threads = cpu_threads  # the default when CLASSIFIER_CPU_THREADS is not set
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self._process: asyncio.subprocess.Process | None = None
        self._deadline = 0.0
        self._rest: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def returncode(self) -> int | None:
        """``None`` while the child runs (or before it was started)."""
        return self._process.returncode if self._process else None

    async def start(self) -> int:
        """Spawn the child and hand it its settings; the port it listens on."""
        loop = asyncio.get_running_loop()
        self._deadline = loop.time() + self.start_timeout_s
        self._process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "classifier.child",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": _pythonpath()},
            start_new_session=True,  # the terminal's Ctrl-C is the parent's to handle
        )
        assert self._process.stdin is not None
        self._process.stdin.write(json.dumps(self._config()).encode() + b"\n")
        await self._process.stdin.drain()
        return int(await self._next("listening"))

    async def ready(self) -> str:
        """Wait until the model is loaded: the version it serves."""
        version = str(await self._next("ready"))
        assert self._process is not None and self._process.stdout is not None
        # what the child prints from now on is read and dropped: a full pipe would block it
        self._rest = asyncio.ensure_future(_discard(self._process.stdout))
        return version

    async def wait(self) -> int:
        """Until the child exits: its exit status."""
        assert self._process is not None
        return await self._process.wait()

    async def stop(self) -> None:
        """End the child's input (it drains and exits); kill it if it takes longer than ``stop_timeout_s``."""
        process = self._process
        if process is None:
            return
        if process.returncode is None:
            assert process.stdin is not None
            process.stdin.close()
            try:
                await asyncio.wait_for(process.wait(), self.stop_timeout_s)
            except TimeoutError:
                log.warning("the classifier process did not stop within %g s: killed it", self.stop_timeout_s)
                process.kill()
                await process.wait()
        if self._rest is not None:
            await self._rest

    def _config(self) -> dict[str, Any]:
        given = {"host": self.host, "port": self.port, "token": self.token, "admin_token": self.admin_token}
        return {
            "settings": {k: v for k, v in given.items() if v is not None},
            "registry": str(self.registry_root) if self.registry_root else None,
            "cpu_threads": self.cpu_threads,
            "log_level": logging.getLogger().getEffectiveLevel(),
        }

    async def _next(self, key: str) -> Any:
        """The child's next report ``key``; ClassifierStartError if the child fails, exits or is late."""
        assert self._process is not None and self._process.stdout is not None
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout_at(self._deadline):
                while line := await self._process.stdout.readline():
                    report = _parse(line)
                    if "error" in report:
                        await self._process.wait()
                        raise ClassifierStartError(f"the classifier process did not start: {report['error']}")
                    if key in report:
                        return report[key]
                status = await self._process.wait()
        except TimeoutError:
            await self.stop()
            waited = self.start_timeout_s - (self._deadline - loop.time())
            raise ClassifierStartError(
                f"the classifier process was not ready within {waited:.0f} s (stopped it)"
            ) from None
        raise ClassifierStartError(f"the classifier process exited with status {status} before it was ready")


def _pythonpath() -> str:
    """This package's folder first: the child runs the same code as the parent, wherever it was started."""
    return os.pathsep.join(filter(None, [str(PACKAGE_ROOT), os.environ.get("PYTHONPATH", "")]))


def _parse(line: bytes) -> dict[str, Any]:
    """A report line from the child; anything else a library printed is ignored."""
    with contextlib.suppress(ValueError):
        report = json.loads(line)
        if isinstance(report, dict):
            return report
    return {}


async def _discard(stream: asyncio.StreamReader) -> None:
    while await stream.read(65536):
        pass


# ---- the child -----------------------------------------------------------------------------------------


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _report(**values: Any) -> None:
    sys.stdout.write(json.dumps(values) + "\n")
    sys.stdout.flush()


def _stop_at_end_of_input(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    """Runs in a thread: the parent closed our input, or died. Either way, time to go."""
    for _ in sys.stdin:
        pass
    with contextlib.suppress(RuntimeError):  # the loop already ended
        loop.call_soon_threadsafe(stop.set)


async def _serve(config: dict[str, Any]) -> None:
    from classifier.paths import registry_dir
    from classifier.registry import Registry
    from classifier.server import load_settings, serve

    settings = load_settings(**config["settings"])
    if settings.cpu_threads is None:
        settings.cpu_threads = config.get("cpu_threads")
    registry = Registry(Path(config["registry"]) if config.get("registry") else registry_dir())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    threading.Thread(target=_stop_at_end_of_input, args=(loop, stop), daemon=True).start()
    # Until the model is loaded the parent speaks for us: a failure is its one line, not also ours.
    server_log = logging.getLogger("classifier.server")
    server_log.disabled = True

    def ready(version: str) -> None:
        server_log.disabled = False
        _report(ready=version)

    listening: list[int] = []

    def report_port(port: int) -> None:
        listening.append(port)
        _report(listening=port)

    try:
        await serve(settings, registry=registry, stop=stop, on_listening=report_port, on_ready=ready)
    except Exception as exc:
        if not listening:
            raise
        name = settings.version or registry.active_name()  # what it was loading when it failed
        raise RuntimeError(f"model {name} in {registry.root} cannot be loaded: {_one_line(exc)}") from exc


def main() -> None:
    config = json.loads(sys.stdin.readline() or "{}")
    logging.basicConfig(level=config.get("log_level", logging.INFO), format=LOG_FORMAT)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)  # a line per message is noise
    try:
        asyncio.run(_serve(config))
    except Exception as exc:  # one line for the parent to report; the details only when debugging
        log.debug("start-up failed", exc_info=True)
        _report(error=_one_line(exc))
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
