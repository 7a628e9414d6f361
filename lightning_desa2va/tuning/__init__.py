"""Sweeps and ablations above the pipeline: Optuna studies whose every trial is a ``run_pipeline`` call,
tracked in MLflow as a parent run per study and a nested run per trial."""
