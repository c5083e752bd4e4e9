#!/usr/bin/env python3
"""Rewrite deploy/k8s/schemas/<version>/ from a kubernetes-validate wheel.

    python3 deploy/k8s/schemas/refresh.py kubernetes_validate-1.37.0-py3-none-any.whl v1.33.0

(`pip download --no-deps kubernetes-validate==1.37.0` fetches the wheel.) It copies the
local-strict schema of each kind in KINDS and a `_definitions.json` cut down to the
definitions those schemas reach, and drops the `description` annotations, which take most
of the bytes and play no part in validation. Nothing else is changed. Standard library only.
"""

import json
import os
import sys
import zipfile

# (kind, apiVersion) of every object deploy/k8s uses; the test refuses any other.
KINDS = [
    ("ConfigMap", "v1"),
    ("Secret", "v1"),
    ("PersistentVolumeClaim", "v1"),
    ("Service", "v1"),
    ("Deployment", "apps/v1"),
    ("Job", "batch/v1"),
]


def file_name(kind, api_version):
    # kubernetes-validate's naming: group domain dropped, "/" -> "-" (apps/v1 -> apps-v1).
    group_version = api_version.split("/")
    if len(group_version) == 2:
        api = group_version[0].split(".")[0] + "-" + group_version[1]
    else:
        api = api_version
    return f"{kind.lower()}-{api}.json"


def strip_descriptions(node, in_properties=False):
    if isinstance(node, dict):
        return {
            k: strip_descriptions(v, k in ("properties", "patternProperties") and not in_properties)
            for k, v in node.items()
            if in_properties or k != "description"
        }
    if isinstance(node, list):
        return [strip_descriptions(v) for v in node]
    return node


def refs(node):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "$ref" and isinstance(v, str):
                yield v
            else:
                yield from refs(v)
    elif isinstance(node, list):
        for v in node:
            yield from refs(v)


def main():
    wheel, version = sys.argv[1], sys.argv[2]
    src = f"kubernetes_validate/kubernetes-json-schema/{version}-local-strict/"
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), version)
    os.makedirs(out, exist_ok=True)
    with zipfile.ZipFile(wheel) as z:
        defs_doc = json.loads(z.read(src + "_definitions.json"))
        kinds = {}
        for kind, api_version in KINDS:
            name = file_name(kind, api_version)
            kinds[name] = json.loads(z.read(src + name))
    defs = defs_doc["$defs"]
    keep, stack = set(), [r for schema in kinds.values() for r in refs(schema)]
    while stack:
        name = stack.pop().split("#/$defs/", 1)[1]
        if name not in keep:
            keep.add(name)
            stack.extend(refs(defs[name]))
    defs_doc["$defs"] = {k: defs[k] for k in sorted(keep)}
    for name, schema in list(kinds.items()) + [("_definitions.json", defs_doc)]:
        with open(os.path.join(out, name), "w") as f:
            json.dump(strip_descriptions(schema), f, indent=1, sort_keys=True)
            f.write("\n")
        print(name, file=sys.stderr)


if __name__ == "__main__":
    main()
