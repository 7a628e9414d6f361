"""Where the MLflow UI shows a study's comparison: a URL that opens the study's experiment on its runs table,
in the model-training view, filtered to the trial runs, sorted by the study's metric, with the J&F columns,
the sampled values and the trial state visible.

MLflow 3's UI opens an experiment on GenAI's "Overview" unless its ``workflowType`` URL parameter (or a
browser-wide toggle) says ``machine_learning``; the table's filter, sort and columns are a *shared view*: an
experiment tag ``mlflow.sharedViewState.<key>`` holding the view state as JSON, opened by the URL parameter
``viewStateShareKey=<key>`` (what the UI's own "Share" button writes).
"""

from __future__ import annotations

import json
from typing import Any

from lightning_desa2va.data.schema import EXPRESSION_TYPES
from lightning_desa2va.tracking import set_experiment_tag
from lightning_desa2va.tuning.mlflow_runs import (
    ROLE_TAG,
    STATE_TAG,
    SWEEP_PARAM_PREFIX,
    TRIAL_ROLE,
    StudyRuns,
)
from lightning_desa2va.tuning.spec import SweepSpec

UI_ADDRESS = "http://127.0.0.1:5000"
"""Where ``make ui`` serves MLflow."""
VIEW_KEY = "sweep-comparison"
SHARED_VIEW_TAG = "mlflow.sharedViewState."
VIEW_TAG = "sweep.view"  # the URL's part after the address, for `desa2va ui` to list
JF_METRICS = ["JF", *(f"JF/{kind}" for kind in EXPRESSION_TYPES)]


def column(kind: str, name: str) -> str:
    """A runs-table column as the UI names it: ``metrics.`val/JF```."""
    return f"{kind}.`{name}`"


def view_state(spec: SweepSpec) -> dict[str, Any]:
    """The trial runs, best first by the study's metric, with its validation curve's last value, the test
    J&F columns (an ablation's trials score test), the sampled values and the trial state."""
    metric = spec.metric[0]
    order = column("metrics", f"val/{metric}")
    metrics = [f"val/{metric}", *(f"test/{name}" for name in JF_METRICS if spec.ablation)]
    selected = [
        *(column("metrics", name) for name in metrics),
        *(column("params", f"{SWEEP_PARAM_PREFIX}{key}") for key in spec.space),
        column("tags", STATE_TAG),
    ]
    return {
        "searchFilter": f"tags.`{ROLE_TAG}` = '{TRIAL_ROLE}'",
        "orderByKey": order,
        "orderByAsc": spec.direction[0].value == "minimize",
        "selectedColumns": selected,
    }


def save_view(runs: StudyRuns, spec: SweepSpec, address: str = UI_ADDRESS) -> str:
    """Write the comparison view on the study's experiment and return the URL that opens it."""
    state = json.dumps(view_state(spec))
    set_experiment_tag(runs.client, runs.experiment_id, SHARED_VIEW_TAG + VIEW_KEY, state)
    path = (
        f"/#/experiments/{runs.experiment_id}/runs?workflowType=machine_learning&viewStateShareKey={VIEW_KEY}"
    )
    set_experiment_tag(runs.client, runs.experiment_id, VIEW_TAG, path)
    return address + path
