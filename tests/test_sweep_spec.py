"""Sweep specs: bad ones fail naming their field before any trial; the shipped ones load; ablations cover
every variant and print a table that names each one and the Sa2VA baseline."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState

from lightning_desa2va.cli import main
from lightning_desa2va.config import config_groups
from lightning_desa2va.tuning.ablation import BASELINE_LABEL, ablation_table, chart_label, collect_variants
from lightning_desa2va.tuning.objective import TEST_ATTR
from lightning_desa2va.tuning.spec import (
    SweepSpecError,
    base_overrides,
    load_spec,
    merge_overrides,
    param_overrides,
)
from lightning_desa2va.tuning.sweep import check_trial_configs

REPO_ROOT = Path(__file__).resolve().parents[1]
SWEEPS = REPO_ROOT / "sweeps"
EXPERIMENTS = REPO_ROOT / "experiments"
GOOD = """
experiment: desa2va_tiny
space:
  decoupler: {type: categorical, choices: [linear, orthogonal]}
  loss.w_orth: {type: log_float, low: 0.01, high: 1.0}
sampler: tpe
n_trials: 4
"""


def write_spec(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (("sampler: tpe", "sampler: annealing"), "sampler"),
        (("low: 0.01, high: 1.0", "low: 1.0, high: 0.01"), "space.loss.w_orth.high"),
        (("low: 0.01, high: 1.0", "low: 0.0, high: 1.0"), "space.loss.w_orth.low"),
        (("n_trials: 4", "n_trials: four"), "n_trials"),
        (("n_trials: 4", ""), "n_trials"),
        (("type: categorical", "type: choice"), "space.decoupler.type"),
        (("choices: [linear, orthogonal]", "choices: []"), "space.decoupler.choices"),
        (("sampler: tpe", "sampler: grid"), "space.loss.w_orth.type"),
        (("sampler: tpe", "sampler: tpe\nseeds: 0"), "seeds"),
        (("sampler: tpe", "sampler: tpe\nbaseline: sa2va"), "baseline"),
        (("sampler: tpe", "sampler: tpe\nmetirc: JF"), "metirc"),
    ],
)
def test_a_bad_spec_fails_naming_its_field(tmp_path, change, field):
    path = write_spec(tmp_path, GOOD.replace(*change))
    with pytest.raises(SweepSpecError, match=f"field '{field}'"):
        load_spec(path)


def test_a_choice_that_is_no_variant_is_named_before_any_trial(tmp_path):
    spec = load_spec(write_spec(tmp_path, GOOD.replace("[linear, orthogonal]", "[linear, orthogonl]")))
    with pytest.raises(SweepSpecError, match=r"field 'space.decoupler.choices\[1\]'.*orthogonl"):
        check_trial_configs(spec, base_overrides(spec, []), EXPERIMENTS)


def test_the_command_prints_a_bad_spec_as_one_line(tmp_path, capsys):
    path = write_spec(tmp_path, GOOD.replace("sampler: tpe", "sampler: annealing"))
    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", str(path)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert error.startswith("desa2va: error: sweep spec") and "'sampler'" in error


def test_an_unknown_profile_is_named(tmp_path):
    with pytest.raises(SweepSpecError, match="no profile 'quik'"):
        load_spec(write_spec(tmp_path, GOOD), "quik")


def test_overrides_of_a_later_group_replace_earlier_ones_and_bundles_expand():
    spec = load_spec(SWEEPS / "ablate_decoupler.yaml", "quick")
    trial = param_overrides(spec, {"decoupler": "sa2va_baseline"})
    assert trial == ["experiment=sa2va_baseline", "trainer.max_steps=40"]
    merged = merge_overrides(base_overrides(spec, ["trainer.max_steps=5"]), trial)
    assert "experiment=desa2va_tiny" not in merged and "trainer.max_steps=5" not in merged
    assert merged[-2:] == trial
    assert param_overrides(spec, {"decoupler": "mlp"}) == ["decoupler=mlp"]


@pytest.mark.parametrize("path", sorted(SWEEPS.glob("*.yaml")), ids=lambda path: path.stem)
def test_every_shipped_spec_and_profile_composes(path):
    for profile in ["default", *load_spec(path).profiles]:
        spec = load_spec(path, profile)
        check_trial_configs(spec, base_overrides(spec, []), EXPERIMENTS)


@pytest.mark.parametrize("group", ["decoupler", "fusion"])
def test_an_ablation_covers_every_variant_of_its_group_and_the_baseline(group):
    for profile in ("default", "quick"):
        spec = load_spec(SWEEPS / f"ablate_{group}.yaml", profile)
        choices = spec.space[group].choices
        assert set(config_groups()[group]) <= set(choices)
        assert spec.baseline in choices and spec.ablation
    assert load_spec(SWEEPS / f"ablate_{group}.yaml").seeds == 3


def test_a_chart_label_puts_one_override_a_line_and_the_baseline_note_on_its_own():
    label = f"experiment=sa2va_baseline motion_prompt=none ({BASELINE_LABEL})"
    assert chart_label(label).splitlines() == [
        "experiment=sa2va_baseline",
        "motion_prompt=none",
        f"({BASELINE_LABEL})",
    ]
    assert chart_label("linear_ortho") == "linear_ortho"


def test_the_ablation_table_names_every_variant_and_the_baseline_with_mean_and_std():
    spec = load_spec(SWEEPS / "ablate_decoupler.yaml")
    study = optuna.create_study(direction="maximize")
    choices = spec.space["decoupler"].choices
    for index, choice in enumerate(choices):
        for seed in range(spec.seeds):
            jf = 0.1 * index + 0.1 * seed
            tests = [{"JF": jf, "JF/static": jf, "qa_accuracy": 0.5, "diag/abs_cos_zt_zv": 0.2}]
            study.add_trial(
                optuna.create_trial(
                    state=TrialState.COMPLETE,
                    value=jf,
                    params={"decoupler": choice, "seed": seed},
                    distributions={
                        "decoupler": CategoricalDistribution(choices),
                        "seed": CategoricalDistribution([0, 1, 2]),
                    },
                    user_attrs={TEST_ATTR: tests},
                )
            )
    table = ablation_table(spec, collect_variants(study, spec))
    labels = [row[0] for row in table.rows]
    assert labels == [*choices[:-1], f"sa2va_baseline ({BASELINE_LABEL})"]
    assert "test split" in table.title and "default profile" in table.title
    orthogonal = table.rows[choices.index("orthogonal")]
    assert orthogonal[1] == "3"  # seeds
    assert orthogonal[table.headers.index("J&F")] == "0.400 ± 0.100"
    assert orthogonal[table.headers.index("J&F motion")] == "-"
    assert orthogonal[table.headers.index("QA acc")] == "0.500 ± 0.000"
