"""The compose file, the Dockerfiles and .env.example, validated offline."""

from __future__ import annotations

import re
import subprocess
import tomllib

import pytest
import yaml

from hm_mlflow.config import Settings

from process_stack import COMPOSE, REPO, parse_dockerfile
from support import BIN

DOCKERFILES = sorted(REPO.glob("*/Dockerfile-*"))
COMPOSE_FILE = REPO / "docker-compose.yaml"
ENV_EXAMPLE = REPO / ".env.example"


def env_example() -> dict[str, str]:
    pairs = (
        line.split("=", 1)
        for line in ENV_EXAMPLE.read_text().splitlines()
        if line and not line.startswith("#")
    )
    return {key: value for key, value in pairs}


def test_every_service_folder_has_its_dockerfile():
    names = {path.relative_to(REPO).as_posix() for path in DOCKERFILES}
    assert names == {
        "jupyter/Dockerfile-jupyter",
        "minio/Dockerfile-buckets",
        "mlflow/Dockerfile-mlflow",
        "model/Dockerfile-model",
        "webapp/Dockerfile-webapp",
    }


def test_compose_file_matches_the_compose_specification():
    done = subprocess.run(
        [
            str(BIN / "check-jsonschema"),
            "--builtin-schema",
            "vendor.compose-spec",
            str(COMPOSE_FILE),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_docker_compose_resolves_references_builds_and_profiles():
    if not COMPOSE.exists():
        pytest.fail(f"{COMPOSE} is missing: make test installs it")
    argv = [
        str(COMPOSE),
        "--env-file",
        str(ENV_EXAMPLE),
        "-f",
        str(COMPOSE_FILE),
        "--profile",
        "train",
        "--profile",
        "notebook",
        "config",
    ]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    services = yaml.safe_load(done.stdout)["services"]
    profiles = {name: service.get("profiles", []) for name, service in services.items()}
    assert profiles == {
        "postgres": [],
        "minio": [],
        "create-buckets": [],
        "mlflow": [],
        "mlflow-access": [],
        "predictions-db": [],
        "webapp": [],
        "bootstrap": [],
        "monitor": [],
        "trainer": ["train"],
        "jupyter": ["notebook"],
    }


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_hadolint_finds_nothing(dockerfile):
    done = subprocess.run(
        [str(BIN / "hadolint"), "--no-color", str(dockerfile)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0 and done.stdout == "", done.stdout


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_images_run_as_a_non_root_user_with_a_healthcheck_decision(dockerfile):
    text = dockerfile.read_text()
    image = parse_dockerfile(dockerfile)
    assert image.user is not None and image.user.isdigit() and int(image.user) >= 1000
    assert "HEALTHCHECK" in text  # a probe, or NONE for one-shot jobs
    for base in re.findall(r"^FROM (\S+)", text, re.MULTILINE):
        assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", base), base


def test_compose_images_are_pinned_and_built_images_named():
    services = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    for name, service in services.items():
        image = service["image"]
        if "build" in service:
            assert image.startswith("hm-mlflow/"), name
        else:
            tag = image.rsplit(":", 1)[-1]
            assert ":" in image and tag != "latest" and any(c.isdigit() for c in tag), image


SECRET = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY", re.IGNORECASE)


def literal_credentials(services: dict) -> list[tuple[str, str, str]]:
    """(service, variable, value) of every secret-looking variable that is not a plain
    reference to .env: a literal, or a reference with a literal default (${X:-secret})."""
    found = []
    for name, service in services.items():
        for key, value in (service.get("environment") or {}).items():
            reference = re.fullmatch(r"\$\{[A-Z_][A-Z0-9_]*(:-|:\?[^}]*)?\}", str(value))
            if SECRET.search(key) and not reference:
                found.append((name, key, str(value)))
    return found


def test_the_credential_check_catches_literals_and_literal_defaults():
    services = {
        "a": {"environment": {"DB_PASSWORD": "hunter2", "API_TOKEN": "${TOKEN:-abc123}"}},
        "b": {"environment": {"X_SECRET": "${X_SECRET}", "Y_SECRET": "${Y:-}", "Z": "plain"}},
        "c": {"environment": {"KEY_PASSWORD": "${KEY_PASSWORD:?set it in .env}"}},
    }
    assert literal_credentials(services) == [
        ("a", "DB_PASSWORD", "hunter2"),
        ("a", "API_TOKEN", "${TOKEN:-abc123}"),
    ]


def test_no_credential_is_written_in_the_compose_file_or_an_image():
    services = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    assert literal_credentials(services) == []
    for service in services.values():
        backend = (service.get("environment") or {}).get("MLFLOW_BACKEND_STORE_URI", "")
        assert "${POSTGRES_PASSWORD}" in backend or not backend
    for dockerfile in DOCKERFILES:
        for key in re.findall(r"\b([A-Z_]+)=", dockerfile.read_text()):
            assert not SECRET.search(key), (dockerfile, key)
    ignored = (REPO / ".dockerignore").read_text().splitlines()
    assert ignored[0] == "*" or "*" in ignored  # allow-list: .env and source/ never sent


def test_every_compose_variable_is_in_env_example():
    used = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", COMPOSE_FILE.read_text()))
    assert used - set(env_example()) == set()


def test_every_setting_is_in_env_example():
    documented = set(env_example())
    for name, field in Settings.model_fields.items():
        variable = field.validation_alias or f"HM_{name.upper()}"
        assert variable in documented, variable


def test_env_example_placeholders_are_usable_as_they_are():
    """cp .env.example .env must start: MinIO wants 8+ character passwords, and the database
    password goes into a URI unescaped."""
    values = env_example()
    assert len(values["MINIO_ROOT_PASSWORD"]) >= 8
    assert re.fullmatch(r"[A-Za-z0-9._-]+", values["POSTGRES_PASSWORD"])
    assert values["MLFLOW_AUTH"] == "false"


def test_duplicated_pins_agree():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    extras = pyproject["project"]["optional-dependencies"]
    buckets = [
        line
        for line in (REPO / "minio/requirements.txt").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert set(buckets) <= set(extras["test"])


def test_the_notebook_image_builds_on_the_training_images_layers():
    """jupyter's Dockerfile repeats model's instruction for instruction up to the install of the
    train extra, then installs the notebook extra in a step of its own: a build of both
    installs PyTorch once, and the two images share those layers (cached by content)."""

    def instructions(path: str) -> list[str]:
        text = (REPO / path).read_text().replace("\\\n", " ")
        lines = [" ".join(line.split()) for line in text.splitlines()]
        return [line for line in lines if line and not line.startswith("#")]

    model = instructions("model/Dockerfile-model")
    jupyter = instructions("jupyter/Dockerfile-jupyter")
    shared = next(i for i, line in enumerate(model) if '".[train]"' in line) + 1
    assert sum(line.startswith("FROM ") for line in model + jupyter) == 2  # one stage each
    assert jupyter[:shared] == model[:shared]
    assert '".[notebook]"' in jupyter[shared] and jupyter[shared].startswith("RUN ")
