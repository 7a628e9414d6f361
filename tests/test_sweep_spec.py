"""Sweep specs: bad ones fail naming their field before any trial; the shipped ones load; ablations cover
every variant and print a table that names each one and the Sa2VA baseline."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState

from lightning_desa2va.cli import main
from lightning_desa2va.config import config_groups
from lightning_desa2va.tuning.ablation import (
    BASELINE_LABEL,
    chart_label,
    collect_variants,
    comparison_table,
    table_title,
)
from lightning_desa2va.tuning.checks import check_trial_configs
from lightning_desa2va.tuning.objective import EXPRESSIONS_ATTR, STEPS_ATTR, TEST_ATTR
from lightning_desa2va.tuning.spec import (
    SweepSpecError,
    base_overrides,
    load_spec,
    merge_overrides,
    param_overrides,
)

pytestmark = pytest.mark.long(seconds=48)  # every shipped spec's trials composed

REPO_ROOT = Path(__file__).resolve().parents[1]
BAD_SPEC_SECONDS = 10
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
        (("sampler: tpe", "sampler: tpe\nmetric: JFF"), "metric"),
        (("sampler: tpe", "sampler: tpe\nablation: true"), "ablation"),
        (("sampler: tpe", "sampler: tpe\nmetric: [JF, step_s]\ndirection: [maximize, minimize]"), "pruner"),
        (("sampler: tpe", "sampler: tpe\nmetric: [JF, step_s]\npruner: none"), "direction"),
        (("sampler: tpe", "sampler: tpe\nmetric: step_s\ndirection: minimize"), "pruner"),
    ],
)
def test_a_bad_spec_fails_naming_its_field(tmp_path, change, field):
    path = write_spec(tmp_path, GOOD.replace(*change))
    with pytest.raises(SweepSpecError, match=f"field '{field}'"):
        load_spec(path)


@pytest.mark.parametrize(
    ("change", "suggested"),
    [
        (("sampler: tpe", "sampler: tpe\nmetirc: JF"), "metric"),
        (("sampler: tpe", "sampler: tpe\nmetric: JFF"), "JF"),
    ],
)
def test_a_near_miss_key_or_metric_gets_a_did_you_mean(tmp_path, change, suggested):
    with pytest.raises(SweepSpecError, match=f"did you mean '{suggested}'"):
        load_spec(write_spec(tmp_path, GOOD.replace(*change)))


def test_a_wrong_metric_fails_before_any_trial_in_seconds(tmp_path):
    """The command reads and checks the spec before importing the model stack: one line, no study made."""
    path = write_spec(tmp_path, GOOD.replace("sampler: tpe", "sampler: tpe\nmetric: val_JF"))
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "lightning_desa2va.cli", "sweep", str(path)],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert time.monotonic() - started < BAD_SPEC_SECONDS
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert "field 'metric'" in done.stderr and "did you mean 'JF'" in done.stderr
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "data").exists()


def test_a_metric_the_last_stage_does_not_log_fails_before_any_trial(tmp_path):
    text = GOOD.replace(
        "sampler: tpe", "sampler: tpe\nmetric: qa_accuracy\noverrides: ['pipeline.stages=[text_pretrain]']"
    )
    spec = load_spec(write_spec(tmp_path, text))
    with pytest.raises(SweepSpecError, match="field 'metric'.*stage text_pretrain logs"):
        check_trial_configs(spec, base_overrides(spec, []), EXPERIMENTS)


def test_an_ablation_whose_arms_train_unequal_steps_is_refused():
    """``trainer.max_steps`` sets every stage alike: DeSa2VA then trains twice the Sa2VA control's steps."""
    spec = load_spec(SWEEPS / "ablate_decoupler.yaml", "quick")
    with pytest.raises(
        SweepSpecError,
        match=(
            r"different total steps: 10 \(text_pretrain 5 \+ decoupled_finetune 5\): the base, "
            r"decoupler=none.*; 5 \(decoupled_finetune 5\): experiment=sa2va_baseline; set"
        ),
    ):
        check_trial_configs(spec, base_overrides(spec, ["trainer.max_steps=5"]), EXPERIMENTS)


def test_the_sa2va_control_trains_the_sum_of_the_default_stages(compose):
    steps = "pipeline.steps={text_pretrain:7,decoupled_finetune:3}"
    control = compose("experiment=sa2va_baseline", steps)
    assert list(control.pipeline.stages) == ["decoupled_finetune"] and control.trainer.max_steps == 10
    default = [
        compose("experiment=desa2va_tiny", steps, f"stage={stage}").trainer.max_steps
        for stage in ("text_pretrain", "decoupled_finetune")
    ]
    assert default == [7, 3]
    assert compose("experiment=sa2va_baseline").trainer.max_steps == 2000


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
    assert trial == ["experiment=sa2va_baseline"]
    merged = merge_overrides(
        base_overrides(spec, ["+x.y=5", "loss.w_t=0.2"]), trial, ["x.y=6", "loss.w_t=0.3"]
    )
    assert "experiment=desa2va_tiny" not in merged and "+x.y=5" not in merged and "loss.w_t=0.2" not in merged
    assert merged[-3:] == [*trial, "x.y=6", "loss.w_t=0.3"]
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


MEANS = {
    "none": 0.5,
    "linear": 0.7,
    "linear_ortho": 0.7,
    "orthogonal": 0.6,
    "mlp": 0.65,
    "sa2va_baseline": 0.55,
}
EXPRESSIONS = 40


def expression_scores(choice: str, seed: int) -> dict[str, list]:
    """J = F per expression: the variant's mean, an offset per expression every variant shares (some are
    harder), a little noise of the variant's own."""
    noise = np.random.default_rng([list(MEANS).index(choice), seed]).normal(0.0, 0.02, EXPRESSIONS)
    hardness = np.linspace(-0.2, 0.2, EXPRESSIONS)
    jf = (MEANS[choice] + 0.01 * seed + hardness + noise).tolist()
    return {
        "ids": [f"v{e}/x" for e in range(EXPRESSIONS)],
        "types": ["static"] * EXPRESSIONS,
        "j": jf,
        "f": jf,
    }


def test_the_ablation_table_gives_intervals_and_paired_differences_from_the_control_and_the_best():
    spec = load_spec(SWEEPS / "ablate_decoupler.yaml")
    study = optuna.create_study(direction="maximize")
    choices = spec.space["decoupler"].choices
    for choice in choices:
        for seed in range(spec.seeds):
            scores = expression_scores(choice, seed)
            jf = float(np.mean(scores["j"]))
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
                    user_attrs={TEST_ATTR: tests, EXPRESSIONS_ATTR: [scores], STEPS_ATTR: 40},
                )
            )
    table = comparison_table(spec, table_title(spec, "every variant"), collect_variants(study, spec))
    rows = {row[0]: dict(zip(table.headers, row, strict=True)) for row in table.rows}
    assert list(rows) == [*choices[:-1], f"sa2va_baseline ({BASELINE_LABEL})"]
    assert "test split" in table.title and "default profile" in table.title and "bootstrap" in table.title
    orthogonal = rows["orthogonal"]
    assert orthogonal["seeds"] == "3" and orthogonal["steps"] == "40"
    means = [float(np.mean(expression_scores("orthogonal", seed)["j"])) for seed in range(3)]
    assert orthogonal["J&F"] == f"{statistics.fmean(means):.3f} ± {statistics.stdev(means):.3f}"
    low, high = (float(x) for x in orthogonal["J&F 95% CI"].strip("[]").split(", "))
    assert low < statistics.fmean(means) < high and high - low < 0.2
    assert float(orthogonal["Δ vs control"].split()[0]) == pytest.approx(0.05, abs=0.01)
    assert "≈" not in orthogonal["Δ vs control"]
    resolution = 2 / (spec.stats.resamples + 1)  # no resample crossed 0: the smallest p it can tell
    assert orthogonal["Δ vs control"].endswith(f"p={resolution:.3f}") and resolution > 0.0005
    assert rows[f"sa2va_baseline ({BASELINE_LABEL})"]["Δ vs control"] == "control"
    tied = [rows[name]["Δ vs best"] for name in ("linear", "linear_ortho")]  # one mean: not told apart
    assert "best" in tied and any(cell.endswith("≈") for cell in tied)
    assert float(orthogonal["Δ vs best"].split()[0]) == pytest.approx(-0.1, abs=0.01)
    assert "≈" not in orthogonal["Δ vs best"]
    assert orthogonal["J&F motion"] == "-" and orthogonal["QA acc"] == "0.500 ± 0.000"
