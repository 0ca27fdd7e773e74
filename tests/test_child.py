"""The embedded default: the engine in a child process (``classifier.child``), so no forward pass runs in
the bot's process; it follows the registry's ACTIVE pointer, dies with its parent, and says in one line
why it cannot start."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from classifier.child import ClassifierStartError
from classifier.client import ChildClassifier, ClassifierUnavailable, RetryPolicy, make_classifier
from classifier.engine import FORWARD_SECONDS
from classifier.registry import Registry
from tests.support.serving import (  # noqa: F401 (fixtures)
    TEXTS,
    assert_heads_match,
    reference,
    registry_fixture,
    registry_template_fixture,
    tiny_base_fixture,
)
from tests.support.tiny_model import make_tiny_version
from tests.support.waiting import eventually

FAST = RetryPolicy(attempts=3, backoff_s=0.01, max_backoff_s=0.05)
REPO = Path(__file__).resolve().parents[1]


def forward_passes_here() -> float:
    """Forward passes run in this process so far (the engine's process-wide histogram)."""
    return sum(s.value for m in FORWARD_SECONDS.collect() for s in m.samples if s.name.endswith("_count"))


def gone(pid: int) -> bool:
    """The process has exited (a zombie not reaped yet counts as exited)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rpartition(")")[2].split()[0] == "Z"


async def test_the_embedded_default_classifies_in_a_child_process_and_follows_active(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLASSIFIER_POLL_INTERVAL_S", "0.1")  # CLASSIFIER_* settings reach the child
    expected = reference(registry, "v1", TEXTS)
    classifier = make_classifier(None, None, registry=registry, retry=FAST)
    assert isinstance(classifier, ChildClassifier)
    before = forward_passes_here()
    try:
        await classifier.start()
        assert classifier.process is not None and classifier.process.pid != os.getpid()
        result = await classifier.classify(TEXTS)
        assert result.model_version == "v1"
        for text_result, ref in zip(result.results, expected, strict=True):
            assert_heads_match({h: asdict(p) for h, p in text_result.heads.items()}, ref)
            assert text_result.truncated == ref["truncated"]
        assert forward_passes_here() == before  # every forward pass ran in the child
        assert [(m.name, m.serving) for m in await classifier.models()] == [("v1", True), ("v2", False)]

        registry.activate("v2", reason="promoted by another process")  # e.g. a retraining run

        async def serves_v2() -> bool:
            return (await classifier.classify(["hi"])).model_version == "v2"

        assert await eventually(serves_v2)
        assert await classifier.activate("v1") == "v1"  # /triage rollback
        assert (await classifier.classify(["hi"])).model_version == "v1"
        assert registry.active_name() == "v1"
    finally:
        await classifier.close()
    assert classifier.process is None


async def test_no_child_until_a_model_exists_and_a_dead_child_is_started_again(
    tmp_path: Path, tiny_base: Path, caplog: pytest.LogCaptureFixture
) -> None:
    registry = Registry(tmp_path / "models")
    classifier = ChildClassifier(registry, retry=FAST)
    try:
        await classifier.start()  # the bot starts before the first training
        assert classifier.process is None
        assert await classifier.models() == []
        with pytest.raises(ClassifierUnavailable, match="no model"):
            await classifier.classify(["before any training"])
        assert classifier.process is None

        make_tiny_version(registry, tiny_base)  # the first training finishes
        assert (await classifier.classify(["after training"])).model_version == "v1"
        assert classifier.process is not None
        first = classifier.process.pid
        assert first is not None

        os.kill(first, signal.SIGKILL)  # e.g. the kernel's out-of-memory killer
        await classifier.process.wait()
        assert (await classifier.classify(["after the crash"])).model_version == "v1"
        assert classifier.process.pid != first
    finally:
        await classifier.close()
    assert "the classifier process exited (status -9): starting it again" in caplog.text


async def test_a_child_that_cannot_start_says_why_in_one_line(
    tmp_path: Path, tiny_base: Path, caplog: pytest.LogCaptureFixture
) -> None:
    registry = Registry(tmp_path / "models")
    version = make_tiny_version(registry, tiny_base)
    (Path(version.path) / "heads.safetensors").write_bytes(b"not a safetensors file")
    classifier = ChildClassifier(registry, retry=FAST)
    caplog.set_level(logging.INFO)
    try:
        with pytest.raises(ClassifierStartError) as failed:
            await classifier.start()
        message = str(failed.value)
        assert message.startswith(f"the classifier process did not start: model v1 in {registry.root} ")
        assert "\n" not in message
        assert classifier.process is None
        with pytest.raises(ClassifierUnavailable, match="did not start"):  # no new try for a while
            await classifier.classify(["hi"])
    finally:
        await classifier.close()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # start()'s caller reports it


async def test_the_child_dies_with_its_parent(registry: Registry) -> None:
    """A bot killed outright (SIGKILL: no clean-up runs) leaves no classifier process behind."""
    parent = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "import asyncio, sys\n"
        "from pathlib import Path\n"
        "from classifier.client import ChildClassifier\n"
        "from classifier.registry import Registry\n"
        "async def main():\n"
        "    classifier = ChildClassifier(Registry(Path(sys.argv[1])))\n"
        "    await classifier.start()\n"
        "    print(classifier.process.pid, flush=True)\n"
        "    await asyncio.Event().wait()\n"
        "asyncio.run(main())\n",
        str(registry.root),
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
    )
    assert parent.stdout is not None
    try:
        line = await asyncio.wait_for(parent.stdout.readline(), timeout=120)
        child = int(line)
        assert not gone(child)
    finally:
        parent.kill()
        await parent.wait()

    async def child_gone() -> bool:
        return gone(child)

    assert await eventually(child_gone), f"the classifier process {child} outlived its parent"
