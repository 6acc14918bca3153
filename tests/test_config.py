"""Every config group option composes into a valid typed run object; bad input stops early with
one line naming the setting, and a non-zero exit."""

from __future__ import annotations

import re
import subprocess
from dataclasses import is_dataclass
from pathlib import Path
from typing import get_type_hints

import pytest
from omegaconf import OmegaConf

from condense.app import cli
from condense.app.labels import METHOD_GROUPS, set_label
from condense.app.validation import validate
from condense.schema import (
    ConfigError,
    EvaluationConfig,
    NetworkConfig,
    RunConfig,
    group_choices,
    to_container,
)
from condense.stages.evaluation import evaluation_pool
from tests.conftest import CONF_DIR, condense_command, condense_in_process, run_config
from tests.conftest import FAST as FAST_OVERRIDES

# Every config group is a typed node of the schema: the list is read off it, never kept by hand.
# `reader`, `stop` and `preset` are typed nodes of plain settings (how stage=evaluate reads a file,
# when to stop, which presets composed the run), no group.
SETTINGS_NODES = ("reader", "stop", "preset")
GROUPS = [
    name
    for name, kind in get_type_hints(RunConfig).items()
    if is_dataclass(kind) and name not in SETTINGS_NODES
]
# Options that refuse to run without one more setting, and the setting their test gives them.
NEEDS = {
    ("ranking", "dd_ranking"): ["ranking.full_run=true"],
    ("matching", "idm"): ["step_policy=single_step"],  # its model queue replaces the inner loop
    ("matching", "trajectory"): ["step_policy=single_step"],  # unrolled student steps, no inner loop
    ("experts", "sgd"): ["method=mtt"],  # read (and named) only by matching=trajectory
    ("experts", "gsam"): ["method=mtt"],
}


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_group_option_composes_and_validates(group: str, option: str) -> None:
    cfg = run_config([f"{group}={option}", *NEEDS.get((group, option), [])])
    assert isinstance(cfg, RunConfig)
    validate(cfg)
    if group == "dataset" or group in METHOD_GROUPS:
        assert getattr(cfg, group).name == option == group_choices(cfg)[group]


def test_every_group_has_options() -> None:
    assert {"dataset", "network", "real_batch", "evaluation", "coreset"} <= set(GROUPS)
    for group in GROUPS:
        assert options(group), group


def test_every_named_group_is_part_of_a_runs_identity() -> None:
    """The plan, W&B's group and config keys all read group_choices: a group with a `name`
    (every one but evaluation and the logger, which is bookkeeping) is in it."""
    cfg = run_config(["real_batch=adaptive", "network=convnet_bn"])
    choices = group_choices(cfg)
    # experts: named only when matching=trajectory, the one family that reads it
    assert set(choices) == set(GROUPS) - {"evaluation", "logger", "experts"}
    assert group_choices(run_config(["method=mtt"]))["experts"] == "sgd"
    assert choices["real_batch"] == "adaptive" and choices["network"] == "convnet/batch"


def test_methods_set_the_papers_variants() -> None:
    expected = {
        "dc": ("intra", "dc", "dc"),
        "ours_m": ("multilevel", "dc", "dc"),
        "ours_md": ("multilevel", "angle_magnitude", "dc"),
        "ours_mda": ("multilevel", "angle_magnitude", "schedule"),
    }
    for method, (matching, distance, policy) in expected.items():
        cfg = run_config([f"method={method}"])
        assert (cfg.matching.name, cfg.distance.name, cfg.step_policy.name) == (
            matching,
            distance,
            policy,
        )
        assert set_label(to_container(cfg)) == method


@pytest.mark.parametrize("preset", options("method"))
def test_every_preset_only_sets_choices_and_is_named_by_them(preset: str) -> None:
    """A preset has no node of its own; the run it composes is labelled by its choices, and
    those choices are the preset's own, so the label is the preset's name."""
    cfg = run_config([f"method={preset}"])
    assert "method" not in to_container(cfg)
    assert set_label(to_container(cfg)) == preset


@pytest.mark.parametrize(
    "overrides,label",
    [
        (
            ["matching=multilevel", "distance=angle_magnitude", "step_policy=schedule"],
            "ours_mda+protocol=dc_2021",  # the default method's protocol, DC's code at its paper
        ),
        (
            ["matching=multilevel", "distance=angle_magnitude", "step_policy=schedule", "protocol=paper"],
            "ours_mda",
        ),
        # one choice from ours_m and from ours_mda alike: ties go to the first preset by name
        (["method=ours_mda", "distance=dc"], "ours_m+step_policy=schedule"),
        (["method=ours_mda", "distance=mse"], "ours_mda+distance=mse"),
        (["real_batch=adaptive"], "dc+real_batch=adaptive"),
        (["method=ours_md", "init=real", "augment=dsa"], "ours_md+init=real+augment=dsa"),
        (["method=dsa", "init=noise"], "dsa+init=noise"),  # dc is two choices away: augment, protocol
        (["method=dc", "protocol=paper"], "dc_paper"),
        (["method=ours_mda", "coreset=herding"], "herding"),
    ],
)
def test_a_run_is_labelled_by_its_choices_not_by_the_preset_named(overrides: list[str], label: str) -> None:
    assert set_label(to_container(run_config(overrides))) == label


def test_run_folder_is_named_by_the_choices() -> None:
    """Hydra's run folder takes the set's label (with '-' for '='), not the preset's name."""
    overrides = ["method=ours_mda", "distance=mse", "ipc=3"]
    hydra_cfg = cli.compose_config(overrides, with_hydra=True)
    folder = OmegaConf.to_container(hydra_cfg.hydra.run, resolve=True)["dir"]
    assert folder.endswith("-digits-ipc3-ours_mda+distance-mse"), folder


def test_command_line_choice_beats_a_methods_default() -> None:
    cfg = run_config(["method=ours_mda", "distance=dc"])
    assert cfg.distance.name == "dc" and cfg.matching.name == "multilevel"


def test_cross_arch_pool_has_the_papers_six_networks() -> None:
    cfg = run_config(["evaluation=cross_arch"])
    pool = evaluation_pool(cfg.network, cfg.evaluation)
    assert list(pool) == ["MLP", "ConvNet", "LeNet", "AlexNet", "VGG11", "ResNet18"]
    assert pool["ResNet18"].name == "resnet18" and pool["AlexNet"].norm == "none"


def test_default_pool_is_the_condensing_network_without_batchnorm_as_dcs_mode_s() -> None:
    # the pool reads two slices of a run: literal dataclasses are enough to call it
    mode_s = EvaluationConfig(without_batchnorm=True)
    assert list(evaluation_pool(NetworkConfig(norm="batch"), mode_s)) == ["ConvNet"]
    assert list(evaluation_pool(NetworkConfig(name="resnet18_ap", norm="batch"), mode_s)) == ["ResNet18"]
    same = run_config(["network=convnet_bn", "evaluation=same_model"])
    assert list(evaluation_pool(same.network, same.evaluation)) == ["ConvNetBN"]


@pytest.mark.parametrize(
    "override,setting",
    [
        ("ipc=0", "ipc"),
        ("iterations=-1", "iterations"),
        ("lr_img=0", "lr_img"),
        ("lr_net=-0.1", "lr_net"),
        ("device=tpu", "device"),
        ("evaluation.epochs=0", "evaluation.epochs"),
        ("distance.magnitude=cube", "distance.magnitude"),
        ("network.norm=weird", "network.norm"),
        ("step_policy=fixed", "step_policy=fixed"),
        ("stage=evaluate", "stage=evaluate"),
        ("augment.strategy=[spin]", "augment.strategy"),
        ("checkpoint_every=-1", "checkpoint_every"),
        ("matching.inter_batch_factor=0", "matching.inter_batch_factor"),
        ("matching.inter_weight=-1", "matching.inter_weight"),
        ("step_policy.cap=0", "step_policy.cap"),
        ("distance.magnitude_weight=-1", "distance.magnitude_weight"),
        ("logger.image_every=0", "logger.image_every"),
        ("logger.mode=sometimes", "logger.mode"),
        ("coreset.name=magic", "coreset"),
        ("coreset.feature_epochs=-1", "coreset.feature_epochs"),
        ("init.name=zeros", "init"),
        ("dataset.name=imagenet", "dataset.name"),
        ("dataset.std=[0.0]", "dataset.mean/std"),
        ("dataset.eval_augment.style=blur", "dataset.eval_augment.style"),
        ("distance.cosine=sine", "distance.cosine"),
        ("evaluation.schedule=cosine", "evaluation.schedule"),
        ("matching.batching=stream", "matching.batching"),
        ("step_policy.monitor_refresh=never", "step_policy.monitor_refresh"),
        ("step_policy.monitor_mode=test", "step_policy.monitor_mode"),
        ("augment.mode=some", "augment.mode"),
        ("matching.warmup_fraction=1.5", "matching.warmup_fraction"),
        ("matching.warmup_steps=-1", "matching.warmup_steps"),
        ("evaluation.convnet_bn.epochs=0", "evaluation.convnet_bn"),
        ("evaluation.convnet_bn.noise=-0.1", "evaluation.convnet_bn"),
        ("evaluation.num_models=many", "evaluation.num_models=many"),
        ("evaluation.num_models=2.5", "evaluation.num_models=2.5"),
        ("evaluation.min_models=1", "evaluation.min_models=1"),
        ("evaluation.max_models=2", "max_models=2"),
        ("evaluation.target_width=0", "evaluation.target_width=0"),
    ],
)
def test_out_of_range_values_name_the_setting(override: str, setting: str) -> None:
    overrides = [override, "step_policy.outer_loop=null"] if override == "step_policy=fixed" else [override]
    with pytest.raises(ConfigError, match=setting.replace("[", r"\[")):
        validate(run_config(overrides))


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return condense_command(*args, cwd=cwd)


def assert_one_error_line(code: int, stderr: str, needle: str) -> None:
    assert code != 0
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], stderr
    assert "Traceback" not in stderr


def test_cli_bad_input_is_one_line_and_non_zero(tmp_path: Path) -> None:
    """The real command in a subprocess: exit status and stderr as a shell sees them."""
    proc = run_cli("ipc=0", "logger=none", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert_one_error_line(proc.returncode, proc.stderr, "ipc=0")


# The same Hydra app in this process (a subprocess costs ~4 s of imports per case).
@pytest.mark.parametrize(
    "args,needle",
    [
        (["lr_img=-1"], "lr_img=-1"),
        (["device=tpu"], "device=tpu"),
        (["dataset=cifar10", "dataset.root=/nonexistent"], "dataset.download=true"),
        (["+evaluation.epochz=3"], "did you mean evaluation.epochs?"),
    ],
)
def test_each_bad_input_is_one_line_and_non_zero(
    args: list[str], needle: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    run_dir = f"hydra.run.dir={tmp_path / 'run'}"
    code = condense_in_process(*args, "logger=none", run_dir, monkeypatch=monkeypatch)
    assert_one_error_line(code, capsys.readouterr().err, needle)


@pytest.mark.parametrize(
    ("added", "message"),
    [
        ("+unknown_key=1", "unknown_key is not a setting of condense"),
        ("+iteration=3", "iteration is not a setting of condense: did you mean iterations?"),
        ("+evaluation.models.MLP.widht=3", "did you mean evaluation.models.MLP.width?"),
    ],
)
def test_an_added_key_the_schema_does_not_define_is_refused(added: str, message: str) -> None:
    """`+key=value` passes Hydra's struct check; a misspelt setting must not run as if unsaid."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        run_config(["evaluation=cross_arch", added])


def test_cli_unknown_group_option_lists_the_valid_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    code = condense_in_process("distance=nope", f"hydra.run.dir={tmp_path / 'run'}", monkeypatch=monkeypatch)
    err = capsys.readouterr().err
    assert code != 0
    assert "angle_magnitude" in err and "Traceback" not in err


def test_every_setting_has_one_role_in_the_run_identity() -> None:
    """schema.ROLES is the one definition of a run's identity: a new top-level setting left out
    of it (or listed twice) fails here, before it can silently change what names or resumes runs."""
    from dataclasses import fields

    from condense.schema import ROLES

    listed = [key for keys in ROLES.values() for key in keys]
    settings = [f.name for f in fields(RunConfig)]
    unclassified, stray = sorted(set(settings) - set(listed)), sorted(set(listed) - set(settings))
    assert not unclassified and not stray, f"unclassified: {unclassified}; not settings: {stray}"
    assert len(listed) == len(set(listed)), "a setting has two roles"


def test_the_identity_table_drives_naming_grouping_and_resuming() -> None:
    """The bookkeeping never enters a run's digest or its folder name; the seed is pooled over."""
    from dataclasses import replace

    from condense.app.labels import folder_free_keys
    from condense.schema import LoggerConfig, protocol_digest

    cfg = run_config(FAST_OVERRIDES)
    precision = {"matching": "fp32"}
    kept = replace(cfg, seed=7, progress=True, checkpoint_every=3, logger=LoggerConfig(name="wandb"))
    assert protocol_digest(kept, precision) == protocol_digest(cfg, precision)
    assert protocol_digest(replace(cfg, ipc=3), precision) != protocol_digest(cfg, precision)
    assert {"logger", "progress", "resume", "checkpoint_every", "output_dir"} <= set(folder_free_keys())


def test_run_record_reads_files_from_before_timings_moved_beside_accuracies() -> None:
    """metrics.json once kept each set's seconds inside its per-architecture results; the typed
    record moves them beside the accuracies, so the report reads old and new files alike."""
    from condense.schema import RunRecord

    old = {
        "config": {},
        "output_dir": "x",
        "label": "dc",
        "evaluation": {"dc": {"ConvNet": {"accuracies": [0.5], "mean": 0.5, "std": 0.0}, "seconds": 3.0}},
        "a_key_from_the_future": 1,
    }
    record = RunRecord.from_dict(old)
    assert record.evaluation == {"dc": {"ConvNet": {"accuracies": [0.5], "mean": 0.5, "std": 0.0}}}
    assert record.own_seconds() == 3.0
    assert "a_key_from_the_future" not in record.to_dict() and "ranking" not in record.to_dict()
    # files from before labels name their set by the preset node they kept
    legacy = {"config": {"method": {"name": "dsa"}}, "output_dir": "x", "evaluation": old["evaluation"]}
    assert RunRecord.from_dict(legacy).label == "dsa"
