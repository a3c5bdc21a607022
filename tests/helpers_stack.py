"""The stack's files as data: docker-compose.yml (with compose's interpolation, the subset the
file uses) and the runtime stage of the Dockerfile (ENV, CMD, HEALTHCHECK)."""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
# `$$`, `${NAME}`, `${NAME:-default}` (unset or empty), `${NAME-default}` (unset only); any
# other `$` is a form these tests do not understand.
_INTERPOLATION = re.compile(r"\$\$|\$\{(\w+)(?:(:?-)([^}]*))?\}|\$")


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def interpolate(text: str, variables: Mapping[str, str]) -> str:
    """`text` as compose reads it, with `variables` standing for the shell and `.env`."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, form, default = match.group(1), match.group(2), match.group(3) or ""
        if name is None:
            raise ValueError(f"unsupported interpolation in {text!r}")
        value = variables.get(name)
        if form == "-":
            return default if value is None else value
        return value or default

    return _INTERPOLATION.sub(replace, text)


def service_environment(service: str, variables: Mapping[str, str]) -> dict[str, str]:
    env = compose()["services"][service].get("environment", {})
    return {name: interpolate(str(value), variables) for name, value in env.items()}


def service_command(service: str, variables: Mapping[str, str]) -> list[str]:
    return [interpolate(str(arg), variables) for arg in compose()["services"][service]["command"]]


@dataclass(frozen=True)
class ImageRuntime:
    """The final stage of the Dockerfile: what a container of the image starts with."""

    env: dict[str, str]  # ENV, except values that refer to other variables (PATH)
    cmd: list[str]
    healthcheck: list[str]


def image_runtime() -> ImageRuntime:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    stage = text.rsplit("\nFROM ", 1)[1]
    env: dict[str, str] = {}
    for line in stage.splitlines():
        if line.startswith("ENV "):
            for pair in shlex.split(line[4:]):
                name, _, value = pair.partition("=")
                if "$" not in value:
                    env[name] = value
    cmd = re.search(r"^CMD (\[.*\])$", stage, re.MULTILINE)
    health = re.search(r"^HEALTHCHECK .* CMD (\[.*\])$", stage, re.MULTILINE)
    assert cmd and health, "the runtime stage needs a JSON-form CMD and HEALTHCHECK CMD"
    return ImageRuntime(env, json.loads(cmd.group(1)), json.loads(health.group(1)))
