"""What a run's set is called, computed from its choices alone.

A preset (conf/method/) only sets choices; it carries no name of its own into a run. The set a
run makes is named after the preset whose choices it has, plus any choice that differs from it
(`dc+real_batch=adaptive`, `ours_mda+distance=dc`), or after its coreset. The same function names
a loaded set from the config stored in its file, so a set is labelled by what made it, not by the
command that evaluates it. The label feeds the run folder, metrics.json, W&B and the report.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

# The groups that say how a set is made (the method's parts); the others (dataset, network,
# evaluation, ...) say where it is made or judged and are named elsewhere in a run's identity.
METHOD_GROUPS = (
    "matching",
    "distance",
    "step_policy",
    "real_batch",
    "init",
    "augment",
    "coreset",
    "protocol",
    "experts",
)
_REPO_CONF = Path(__file__).resolve().parents[2] / "conf"


def conf_dir() -> Path:
    """The config tree: the repository's conf/ in a checkout, the packaged copy otherwise."""
    if (_REPO_CONF / "config.yaml").exists():
        return _REPO_CONF
    return Path(str(resources.files("condense.conf")))


def _defaults_choices(path: Path) -> dict[str, str]:
    """group -> option from a YAML file's defaults list (`group: option` or `override /group: option`);
    a plain name is another config of the same group that this one extends (method=ftd extends mtt),
    whose choices come first."""
    choices = {}
    for entry in OmegaConf.to_container(OmegaConf.load(path)).get("defaults", []):  # type: ignore[union-attr]
        if isinstance(entry, str) and entry != "_self_" and (path.parent / f"{entry}.yaml").exists():
            choices.update(_defaults_choices(path.parent / f"{entry}.yaml"))
        elif isinstance(entry, dict):
            for key, option in entry.items():
                group = str(key).removeprefix("override ").strip().lstrip("/")
                if " " not in group and isinstance(option, str):
                    choices[group] = option
    return choices


@cache
def preset_choices() -> dict[str, dict[str, str]]:
    """Each preset's choices of the method groups: config.yaml's defaults, then its overrides."""
    base = _defaults_choices(conf_dir() / "config.yaml")
    presets = {}
    for path in sorted((conf_dir() / "method").glob("*.yaml")):
        chosen = {**base, **_defaults_choices(path)}
        presets[path.stem] = {group: chosen[group] for group in METHOD_GROUPS if group in chosen}
    return presets


def method_choices(config: Mapping[str, Any]) -> dict[str, str]:
    """The method groups' options read off a resolved config (a RunConfig as a dict, or the
    config stored in a set's file)."""
    return {
        group: str(config[group]["name"])
        for group in METHOD_GROUPS
        if isinstance(config.get(group), Mapping) and "name" in config[group]
    }


def set_label(config: Mapping[str, Any]) -> str:
    """The set's name: its coreset, or the closest preset plus every choice that differs from it
    (of equally close presets, the first by name)."""
    choices = method_choices(config)
    if choices.get("coreset", "none") != "none":
        return choices["coreset"]
    legacy = config.get("method")  # files written while a preset was a config node of its own
    if isinstance(legacy, Mapping) and legacy.get("kind") == "coreset":
        return str(legacy["name"])
    best, best_gaps = "", list(choices.items())
    for name, preset in preset_choices().items():
        if preset.get("coreset", "none") != "none":
            continue
        gaps = [(g, o) for g, o in choices.items() if preset.get(g, o) != o]
        if len(gaps) < len(best_gaps) or not best:
            best, best_gaps = name, gaps
    return "+".join([best, *(f"{group}={option}" for group, option in best_gaps)])


def stored_label(path: str, layout: str) -> str | None:
    """The label of a set on disk as stage=evaluate will name it, read without loading it: a
    condense file by its stored config, another tool's by `loaded-` and its file name; None when
    the file cannot be read (the run then refuses it in one line)."""
    from condense.primitives.synthetic import stored_config

    file = Path(path).expanduser()
    if layout in ("auto", "condense") and file.suffix == ".safetensors":
        config = stored_config(file)
        return set_label(config) if config else None
    return f"loaded-{file.stem or file.name}" if file.exists() else None


def folder_label(*, _root_: Any) -> str:
    """set_label as a folder name (no '='), an OmegaConf resolver for hydra.run.dir: the folder
    is named after the set's choices, whatever preset or overrides produced them; a stage=evaluate
    run after the loaded set (stored_label)."""
    label = None
    if _root_.get("stage") == "evaluate" and _root_.get("synthetic"):
        label = stored_label(str(_root_["synthetic"]), str(_root_["reader"]["layout"]))
    if label is None:
        config = {g: {"name": _root_[g]["name"]} for g in METHOD_GROUPS if g in _root_}
        label = set_label(config)
    return "".join(c if c.isalnum() or c in "+-_." else "-" for c in label)


def folder_free_keys() -> list[str]:
    """Hydra's override_dirname.exclude_keys: the bookkeeping settings (schema.ROLES), the device
    and the experiment preset, so a sweep job's folder names only what it computes (and
    resume=true finds the same folders)."""
    from condense.schema import keys_with_role

    return [*keys_with_role("bookkeeping"), "device", "experiment"]


# File systems refuse a name over 255 bytes; the job number and its dash come before this part.
FOLDER_NAME_MAX = 200
DIGEST_CHARS = 12


def fitting_folder_name(name: str) -> str:
    """A sweep job's folder name (its overrides) as one folder, cut to fit a file system: a '/' in
    a value (a path: dataset.root=/data) is written %2F, not a folder level that the sweep's
    readers would not find; a long name ends in a digest of the whole when cut, so two long names
    never meet and resume=true finds the same folder."""
    name = name.replace("/", "%2F")
    raw = name.encode()
    if len(raw) <= FOLDER_NAME_MAX:
        return name
    digest = hashlib.sha1(raw).hexdigest()[:DIGEST_CHARS]
    return raw[: FOLDER_NAME_MAX - DIGEST_CHARS - 1].decode(errors="ignore") + "-" + digest


def register_label_resolvers() -> None:
    OmegaConf.register_new_resolver("set_folder", folder_label, replace=True)
    OmegaConf.register_new_resolver("fitting_folder", fitting_folder_name, replace=True)
    OmegaConf.register_new_resolver("folder_free_keys", folder_free_keys, replace=True)
