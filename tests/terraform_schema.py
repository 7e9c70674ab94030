"""Check Terraform blocks against the providers' own schemas, offline.

`terraform validate` needs provider binaries from a registry these machines cannot reach; the
schemas come instead from the providers' jsii assemblies (tests/provider_schemas/, see extract.py
there). python-hcl2 parses the .tf files and marks blocks with `__is_block__`, so an argument
written as a block, a block written as an argument, an unknown name or a missing required one
are all told apart.
"""

from __future__ import annotations

import gzip
import json
from functools import cache
from pathlib import Path

import hcl2

SCHEMAS = Path(__file__).parent / "provider_schemas"
META_ARGUMENTS = {"count", "for_each", "depends_on", "provider"}
META_BLOCKS = {"lifecycle", "provisioner", "connection"}


@cache
def schemas() -> dict[str, dict]:
    """{"aws": schema} from the committed extract."""
    found = {}
    for path in sorted(SCHEMAS.glob("*-provider-*.json.gz")):
        with gzip.open(path, "rt") as handle:
            found[path.name.split("-provider-")[0]] = json.load(handle)
    return found


def unquote(label: str) -> str:
    return label.strip('"')


def _is_block(value) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(item, dict) and item.get("__is_block__") for item in value)
    )


def check_body(body: dict, schema: dict, where: str, top: bool = False) -> list[str]:
    """Problems of one block body against its schema ({"args": ..., "blocks": ...})."""
    problems, present = [], set()
    for key, value in body.items():
        if key.startswith("__"):
            continue
        if key == "dynamic":
            for dynamic in value:
                for label, spec in dynamic.items():
                    if label.startswith("__"):
                        continue
                    name = unquote(label)
                    present.add(name)
                    if name not in schema["blocks"]:
                        problems.append(f"{where}: unknown block {name!r} (dynamic)")
                        continue
                    for content in spec.get("content", []):
                        problems += check_body(content, schema["blocks"][name], f"{where}.{name}")
        elif top and (key in META_BLOCKS or key in META_ARGUMENTS):
            continue
        elif _is_block(value):
            present.add(key)
            if key not in schema["blocks"]:
                hint = " (an argument, written as a block)" if key in schema["args"] else ""
                problems.append(f"{where}: unknown block {key!r}{hint}")
                continue
            for item in value:
                problems += check_body(item, schema["blocks"][key], f"{where}.{key}")
        else:
            present.add(key)
            if key not in schema["args"]:
                hint = " (a block, written as an argument)" if key in schema["blocks"] else ""
                problems.append(f"{where}: unknown argument {key!r}{hint}")
    for name, required in schema["args"].items():
        if required and name not in present:
            problems.append(f"{where}: missing required argument {name!r}")
    for name, spec in schema["blocks"].items():
        if spec["required"] and name not in present:
            problems.append(f"{where}: missing required block {name!r}")
    return problems


def check_file(path: Path) -> list[str]:
    """Problems of every resource, data source and provider block in one .tf file."""
    with path.open() as handle:
        document = hcl2.load(handle)
    return check_document(document, path.name)


def check_document(document: dict, filename: str) -> list[str]:
    problems = []
    for kind, section in (("resource", "resource"), ("data", "data")):
        for entry in document.get(kind, []):
            for type_label, named in entry.items():
                if type_label.startswith("__"):
                    continue
                block_type = unquote(type_label)
                provider = block_type.split("_")[0]
                catalogue = schemas().get(provider, {}).get(section, {})
                for name_label, body in named.items():
                    if name_label.startswith("__"):
                        continue
                    where = f"{filename}: {kind} {block_type}.{unquote(name_label)}"
                    if block_type not in catalogue:
                        problems.append(f"{where}: no such {kind} type in the provider schema")
                        continue
                    problems += check_body(body, catalogue[block_type], where, top=True)
    for entry in document.get("provider", []):
        for label, body in entry.items():
            if label.startswith("__"):
                continue
            name = unquote(label)
            where = f"{filename}: provider {name}"
            if name not in schemas():
                problems.append(f"{where}: no schema for this provider")
                continue
            body = {k: v for k, v in body.items() if k != "alias"}
            problems += check_body(body, schemas()[name]["provider_block"], where)
    return problems
