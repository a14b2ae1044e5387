"""Configuration: file, ${VAR} expansion, KILN_ overrides, and errors that name the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from kiln.config import ConfigError, load_config

EXAMPLE = Path(__file__).resolve().parents[2] / "config.example.yml"


def test_the_example_config_loads_and_documents_every_field() -> None:
    config = load_config(EXAMPLE, env={})
    assert config.database.url == ""
    assert config.build.goproxy == "https://proxy.golang.org"
    text = EXAMPLE.read_text()

    def fields(model: object, prefix: str = "") -> list[str]:
        out = []
        for name, _info in type(model).model_fields.items():  # type: ignore[attr-defined]
            value = getattr(model, name)
            if hasattr(type(value), "model_fields"):
                out += fields(value, f"{prefix}{name}.")
            else:
                out.append(f"{prefix}{name}")
        return out

    missing = [f for f in fields(config) if f"{f.rsplit('.', 1)[-1]}:" not in text]
    assert missing == []


def test_env_expansion_and_overrides(tmp_path: Path) -> None:
    file = tmp_path / "c.yml"
    file.write_text(
        "database:\n  url: postgresql://${DB_HOST}/kiln\n"
        "storage:\n  local:\n    path: ${ART:-/srv/artifacts}\n"
        "worker:\n  concurrency: 4\n"
    )
    config = load_config(file, env={"DB_HOST": "db.internal", "KILN_WORKER__CONCURRENCY": "8",
                                    "KILN_BUILD__TAGS": "[a, b]"})
    assert config.database.url == "postgresql://db.internal/kiln"
    assert config.storage.local.path == Path("/srv/artifacts")
    assert config.worker.concurrency == 8
    assert config.build.tags == ["a", "b"]


def test_config_path_variable_is_used(tmp_path: Path) -> None:
    file = tmp_path / "other.yml"
    file.write_text("api:\n  listen: 0.0.0.0:9000\n")
    assert load_config(env={"CONFIG_PATH": str(file)}).api.listen == "0.0.0.0:9000"
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(env={"CONFIG_PATH": str(tmp_path / "missing.yml")})


@pytest.mark.parametrize(
    ("text", "env", "expected"),
    [
        ("worker:\n  concurrency: zero\n", {}, "worker.concurrency"),
        ("worker:\n  concurency: 2\n", {}, "worker.concurency: unknown field"),
        ("build:\n  sandbox: chroot\n", {}, "build.sandbox"),
        ("build:\n  goproxy: direct\n", {}, "build.goproxy"),
        ("api:\n  listen: 8080\n", {}, "api.listen"),
        ("database:\n  url: ${NOPE}\n", {}, "${NOPE} is used in the config but not set"),
        ("- a\n- b\n", {}, "top level must be a mapping"),
        ("", {"KILN_WORKER__LEASE_SECONDS": "-1"}, "worker.lease_seconds"),
        # one secret signing every delivery is gone: each subscription has its own
        ("webhooks:\n  secret: s3cret\n", {}, "webhooks.secret is no longer used"),
    ],
)
def test_bad_config_names_the_field(tmp_path: Path, text: str, env: dict[str, str],
                                    expected: str) -> None:
    file = tmp_path / "c.yml"
    file.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(file, env=env)
    assert expected in str(info.value)


def test_an_empty_leftover_webhook_secret_is_accepted(tmp_path: Path) -> None:
    file = tmp_path / "c.yml"
    file.write_text('webhooks:\n  secret: "${KILN_WEBHOOK_SECRET:-}"\n  interval: 5\n')
    assert load_config(file, env={}).webhooks.interval == 5
