"""Extract a Terraform provider's argument schema from the jsii assembly of `@cdktn/provider-*`.

`terraform init`/`validate` need the provider binary from the Terraform registry, which these
machines cannot reach. The npm package `@cdktn/provider-aws` is generated from the provider's own
schema and ships it as a jsii assembly (`package/.jsii`): per resource and data source, a config
interface whose properties are the Terraform arguments (`optional` marks the optional ones) and
whose struct-typed properties are nested blocks. This script walks it into a small JSON file:

    {"resource": {"aws_lb_listener_rule": {
        "args": {"listener_arn": true, "priority": false},
        "blocks": {"action": {"required": true, "args": {...}, "blocks": {...}}}}},
     "data": {...}}

(true = required). Not in the assembly: conflicts, exactly-one-of rules, enum values.

    npm pack @cdktn/provider-aws@25.7.0          # 46 MB tarball, nothing installed
    tar xzf cdktn-provider-aws-25.7.0.tgz package/.jsii
    python tests/provider_schemas/extract.py package/.jsii \
        tests/provider_schemas/aws-provider-6.66.0.json.gz
"""

from __future__ import annotations

import gzip
import json
import re
import sys

_LINK = re.compile(r"/docs/(resources|data-sources)/([a-z0-9_]+)#([a-z0-9_]+)")
_PROVIDER = re.compile(r"registry\.terraform\.io/providers/([a-z0-9-]+/[a-z0-9-]+)/([0-9.]+)/docs")
_BLOCK = re.compile(r"^([a-z0-9_]+) block\.")


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _struct_of(type_ref: dict) -> str | None:
    """The struct a property's type names (directly, in a list, or in a union), or None."""
    if "fqn" in type_ref and not type_ref["fqn"].startswith("cdktn."):
        return type_ref["fqn"]
    if "collection" in type_ref:
        return _struct_of(type_ref["collection"]["elementtype"])
    for option in type_ref.get("union", {}).get("types", []):
        found = _struct_of(option)
        if found:
            return found
    return None


def _argument_name(prop: dict) -> str:
    docs = prop.get("docs", {})
    text = f"{docs.get('summary', '')} {docs.get('remarks', '')}"
    link = _LINK.search(text)
    if link:
        return link.group(3)
    block = _BLOCK.match(docs.get("summary", ""))
    return block.group(1) if block else _snake(prop["name"])


def _schema(types: dict, fqn: str, seen: tuple[str, ...] = ()) -> dict:
    args, blocks = {}, {}
    for prop in types[fqn].get("properties", []):
        name = _argument_name(prop)
        required = not prop.get("optional", False)
        struct = _struct_of(prop["type"])
        if struct and struct in types and struct not in seen:
            blocks[name] = {"required": required, **_schema(types, struct, (*seen, fqn))}
        else:
            args[name] = required
    return {"args": args, "blocks": blocks}


def extract(assembly: dict) -> dict:
    types = assembly["types"]
    config = next(
        fqn
        for fqn in types
        if fqn.startswith(f"{assembly['name']}.provider.") and fqn.endswith("ProviderConfig")
    )
    provider = _PROVIDER.search(json.dumps(types[config]))
    prefix = provider.group(1).split("/")[1]  # hashicorp/aws -> aws_
    out = {
        "provider": {"source": provider.group(1), "version": provider.group(2)},
        "source": f"{assembly['name']}@{assembly['version']} (npm), file package/.jsii",
        "license": assembly.get("license"),
        "provider_block": _schema(types, config),
        "resource": {},
        "data": {},
    }
    for fqn, spec in types.items():
        if "cdktn.TerraformMetaArguments" not in spec.get("interfaces", []):
            continue
        links = [
            _LINK.search(f"{p['docs'].get('summary', '')} {p['docs'].get('remarks', '')}")
            for p in spec.get("properties", [])
        ]
        link = next((m for m in links if m), None)
        if link is None:
            continue
        kind = "resource" if link.group(1) == "resources" else "data"
        out[kind][f"{prefix}_{link.group(2)}"] = _schema(types, fqn)
    return out


def main(source: str, target: str) -> None:
    with open(source) as handle:
        schema = extract(json.load(handle))
    text = json.dumps(schema, sort_keys=True, separators=(",", ":"))
    with open(target, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as handle:
        handle.write(text.encode())  # mtime 0: the same input gives the same bytes
    print(f"{len(schema['resource'])} resources, {len(schema['data'])} data sources -> {target}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
