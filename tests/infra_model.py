"""infra/ as data, for the wiring tests: tfparse evaluates variables, locals, for_each and
dynamic blocks and replaces a reference to a resource by that resource's generated `id`;
python-hcl2 keeps the raw expressions for values only AWS knows (ARNs, bucket names)."""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

import hcl2
import tfparse

INFRA = Path(__file__).resolve().parents[1] / "infra"


@cache
def model() -> dict:
    return tfparse.load_from_path(INFRA)


def resources(block_type: str) -> dict[str, dict]:
    """Resources (or data sources) of one type by their address, e.g. 'aws_lb.this["public"]'."""
    return {item["__tfmeta"]["path"]: item for item in model().get(block_type, [])}


def one(block_type: str, address: str) -> dict:
    return resources(block_type)[address]


@cache
def by_id() -> dict[str, str]:
    """Generated id -> address, for every resource and data source."""
    index = {}
    for block_type, items in model().items():
        if block_type in {"locals", "variable", "output", "terraform", "provider"}:
            continue
        for item in items if isinstance(items, list) else []:
            if isinstance(item, dict) and "id" in item and "__tfmeta" in item:
                index[item["id"]] = item["__tfmeta"].get("path", block_type)
    return index


def address(ref: str | None) -> str | None:
    """The address a resolved reference stands for."""
    return by_id().get(ref) if ref else None


@cache
def local_values() -> dict:
    return {
        key: value
        for entry in model()["locals"]
        for key, value in entry.items()
        if not key.startswith("__")
    }


def blocks(value) -> list[dict]:
    """A nested block as tfparse gives it: one dict, or a list of them."""
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


@cache
def raw_locals() -> dict[str, str]:
    """Every local's raw expression, as python-hcl2 reads it."""
    out = {}
    for path in INFRA.glob("*.tf"):
        with path.open() as handle:
            for entry in hcl2.load(handle).get("locals", []):
                out.update({k: str(v) for k, v in entry.items() if not k.startswith("__")})
    return out


def references(expression: str) -> set[str]:
    """Resource and module names an HCL expression refers to."""
    return set(re.findall(r"\b((?:module|aws_[a-z0-9_]+)\.[a-z0-9_]+)", expression))


def containers(task: str) -> list[dict]:
    """Container definitions of one task definition, from the locals they are encoded from."""
    return local_values()["task_definitions"][task]["containers"]


def container(task: str, name: str) -> dict:
    return next(c for c in containers(task) if c["name"] == name)


def env(definition: dict) -> dict[str, str | None]:
    return {item["name"]: item["value"] for item in definition.get("environment", [])}
