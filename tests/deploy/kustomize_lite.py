"""Render a kustomization the way `kubectl kustomize` does, for the subset deploy/k8s uses (no kustomize binary
comes from a package registry): `resources` (files, or directories with their own kustomization.yaml), `images`
(newName / newTag of containers whose image is `name`), and `patches` that are JSON 6902 operation lists with a
`target` kind + name. Any other key is an error, so a manifest change that needs more cannot pass unrendered."""

from __future__ import annotations

import copy
from pathlib import Path

import jsonpatch
import yaml

SUPPORTED = {"apiVersion", "kind", "resources", "images", "patches"}


def load_documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def render(directory: Path) -> list[dict]:
    """The objects of the kustomization in `directory`, in resource order, images set and patches applied."""
    spec = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(spec) - SUPPORTED
    if unknown:
        raise ValueError(f"{directory}/kustomization.yaml: keys {sorted(unknown)} are not supported by this renderer")
    objects: list[dict] = []
    for entry in spec.get("resources", []):
        path = (directory / entry).resolve()
        objects.extend(render(path) if path.is_dir() else load_documents(path))
    for image in spec.get("images", []):
        _set_image(objects, image)
    for patch in spec.get("patches", []):
        target = patch["target"]
        operations = yaml.safe_load((directory / patch["path"]).read_text())
        matched = [i for i, o in enumerate(objects)
                   if o["kind"] == target["kind"] and o["metadata"]["name"] == target["name"]]  # fmt: skip
        if not matched:
            raise ValueError(f"{directory}: patch {patch['path']} matches no {target['kind']}/{target['name']}")
        for i in matched:
            objects[i] = jsonpatch.apply_patch(copy.deepcopy(objects[i]), operations)
    return objects


def _set_image(objects: list[dict], image: dict) -> None:
    for obj in objects:
        pod = obj.get("spec", {}).get("template", {}).get("spec", {})
        for container in pod.get("containers", []) + pod.get("initContainers", []):
            ref = container["image"]
            colon = ref.rfind(":")
            name, tag = (ref[:colon], ref[colon + 1:]) if colon > ref.rfind("/") else (ref, "")  # host:port/x
            if name == image["name"]:
                container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag or 'latest')}"
