"""Why this label: training embeddings saved with a version, the nearest training messages of the
predicted topic from the engine (both backends) and the HTTP API, and forgetting rows removes theirs."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp
import numpy as np
import pytest

from classifier.client import ChildClassifier
from classifier.data import Example, write_jsonl
from classifier.engine import Engine
from classifier.neighbors import NeighborIndex, _write, erase, normalized
from classifier.registry import Registry, VersionFiles
from classifier.results import ClassifyResponse, InvalidInput
from classifier.schema import LabelSchema
from classifier.train import TrainConfig, train
from tests.support.model_fixtures import learnable_rows
from tests.support.serving import TOKEN, engine_config, running_server


def _index_folder(folder: Path, vectors: np.ndarray, labels: list[str]) -> None:
    """A version folder with dataset.jsonl lines t0..tN and every line's embedding saved."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [Example(text=f"t{i}", labels={"topic": label}, source=f"s{i}") for i, label in enumerate(labels)]
    write_jsonl(VersionFiles(folder).dataset, rows)
    _write(
        VersionFiles(folder).neighbors,
        normalized(vectors).astype(np.float16),
        np.arange(len(labels)),
        np.array(labels),
        "topic",
    )


def test_nearest_are_the_most_similar_rows_of_the_label_most_similar_first(tmp_path: Path) -> None:
    vectors = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.7, 0.7], [1, 0.05], [-1, 0]], dtype=np.float32)
    _index_folder(tmp_path, vectors, ["a", "a", "a", "a", "b", "a"])
    files = VersionFiles(tmp_path)
    index = NeighborIndex.load(files.neighbors, files.dataset)
    assert index is not None
    near = index.nearest(normalized(np.array([1.0, 0.0])), "a", 3)
    assert [n.text for n in near] == ["t0", "t1", "t3"]  # t4 is closer but labeled b
    assert [n.source for n in near] == ["s0", "s1", "s3"]  # whose text it is: the bot resolves slack: rows
    assert near[0].similarity == pytest.approx(1.0, abs=1e-3) and all(n.label == "a" for n in near)
    assert [n.text for n in index.nearest(normalized(np.array([1.0, 0.0])), "b", 3)] == ["t4"]
    assert index.nearest(np.ones(2), "unknown", 3) == []
    assert NeighborIndex.load(VersionFiles(tmp_path / "none").neighbors, files.dataset) is None


def test_erase_drops_the_rows_and_renumbers_the_rest(tmp_path: Path) -> None:
    vectors = np.eye(5, dtype=np.float32)
    _index_folder(tmp_path, vectors, ["a"] * 5)
    files = VersionFiles(tmp_path)
    erase(files.neighbors, [1, 3])
    rows = [Example(text=f"t{i}", labels={"topic": "a"}) for i in (0, 2, 4)]
    write_jsonl(files.dataset, rows)  # as the registry rewrites it
    index = NeighborIndex.load(files.neighbors, files.dataset)
    assert index is not None
    for i in (0, 2, 4):  # each row still finds its own text first
        assert index.nearest(vectors[i], "a", 1)[0].text == f"t{i}"
    assert sorted(n.text for n in index.nearest(vectors[0], "a", 5)) == ["t0", "t2", "t4"]


def test_neighbors_count_is_validated_and_round_trips_over_http() -> None:
    from classifier.results import check_neighbors

    for bad in (-1, 11, 1.5, "3", True):
        with pytest.raises(InvalidInput):
            check_neighbors(bad)
    body = {
        "model_version": "v1",
        "results": [{"topic": {"label": "a", "confidence": 0.9, "scores": {"a": 0.9}}}],
        "truncated": [False],
        "neighbors": [[{"text": "t0", "label": "a", "similarity": 0.5, "source": "slack:3"}]],
    }
    assert ClassifyResponse.of(ClassifyResponse.model_validate(body).result()).body() == body
    del body["neighbors"]
    plain = ClassifyResponse.model_validate(body).result()
    assert plain.results[0].neighbors is None
    assert ClassifyResponse.of(plain).body() == body  # absent when not asked for


@pytest.fixture(scope="module")
def trained(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Registry:
    rows = learnable_rows(120)
    examples = [
        Example(text=r["text"], labels={"topic": r["topic"], "sentiment": r["sentiment"]}, source=f"f:{i}")
        for i, r in enumerate(rows)
    ]
    schema = LabelSchema(heads={"topic": ["billing", "bug", "outage"], "sentiment": ["negative", "positive"]})
    registry = Registry(tmp_path_factory.mktemp("neighbors") / "models")
    config = TrainConfig(
        base_model=str(tiny_bert), epochs=2, learning_rate=2e-3, batch_size=16, max_length=24
    )
    train(examples, schema, config, registry, progress=False)
    return registry


@pytest.mark.parametrize("backend", ["torch", "onnx"])
async def test_engine_returns_the_nearest_training_messages_of_the_predicted_topic(
    trained: Registry, backend: str
) -> None:
    info = trained.get("v1")
    folder = Path(info.path)
    dataset = [json.loads(line) for line in (folder / "dataset.jsonl").read_text().splitlines()]
    saved = np.load(info.files.neighbors)
    assert saved["embeddings"].dtype == np.float16 and len(saved["rows"]) == info.data["splits"]["train"]
    training_text = dataset[int(saved["rows"][0])]["text"]

    async with Engine(trained, engine_config(backend=backend, quantize="none")) as engine:
        plain = await engine.classify([training_text])
        assert plain.results[0].neighbors is None and "neighbors" not in ClassifyResponse.of(plain).body()
        result = await engine.classify([training_text, "the app crashes with an error"], neighbors=3)
        with pytest.raises(InvalidInput):
            await engine.classify(["x"], neighbors=11)
    for text_result in result.results:
        near = text_result.neighbors
        assert near is not None and len(near) == 3
        assert all(n.label == text_result.heads["topic"].label for n in near)
        assert [n.similarity for n in near] == sorted((n.similarity for n in near), reverse=True)
    first = result.results[0].neighbors
    assert first is not None
    assert first[0].text == training_text and first[0].similarity == pytest.approx(1.0, abs=0.01)


async def test_the_embedded_default_child_process_answers_why_too(trained: Registry) -> None:
    """The bot's default classifier (a child process) passes ``neighbors`` on: cards ask for them."""
    folder = Path(trained.get("v1").path)
    dataset = [json.loads(line) for line in (folder / "dataset.jsonl").read_text().splitlines()]
    training_text = dataset[int(np.load(VersionFiles(folder).neighbors)["rows"][0])]["text"]
    classifier = ChildClassifier(trained)
    try:
        await classifier.start()
        plain = await classifier.classify([training_text])
        asked = await classifier.classify([training_text], neighbors=3)
    finally:
        await classifier.close()
    assert plain.results[0].neighbors is None
    near = asked.results[0].neighbors
    assert near is not None and len(near) == 3 and near[0].text == training_text


async def test_http_api_returns_neighbors_and_forgetting_a_row_removes_its_embedding(
    trained: Registry,
) -> None:
    folder = Path(trained.get("v1").path)
    dataset = [json.loads(line) for line in (folder / "dataset.jsonl").read_text().splitlines()]
    saved = np.load(VersionFiles(folder).neighbors)
    forgotten = dataset[int(saved["rows"][0])]
    before = len(saved["rows"])
    trained.erase_rows([forgotten["source"]])
    after = np.load(VersionFiles(folder).neighbors)
    assert len(after["rows"]) == before - 1

    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with (
        Engine(trained, engine_config(backend="torch")) as engine,
        running_server(engine) as url,
        aiohttp.ClientSession() as http,
    ):
        async with http.post(
            f"{url}/v1/classify", json={"texts": [forgotten["text"]], "neighbors": 5}, headers=headers
        ) as response:
            assert response.status == 200
            body = await response.json()
        async with http.post(
            f"{url}/v1/classify", json={"texts": ["x"], "neighbors": "all"}, headers=headers
        ) as response:
            assert response.status == 422 and "neighbors" in (await response.json())["error"]
    near = body["neighbors"][0]
    assert len(near) == 5 and forgotten["text"] not in [n["text"] for n in near]
    lines = {json.loads(line)["text"] for line in (folder / "dataset.jsonl").read_text().splitlines()}
    assert all(n["text"] in lines for n in near)
