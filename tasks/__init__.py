"""The pipeline's steps as plain functions (no Prefect needed), one subpackage per concern.

Layers, lower first (imports only go down; tests/test_architecture.py checks it):

    data       ingest, decode, sources, manifest, validate, versioning, demo, folders
    training   pretrain, evaluate, DVC exports          (uses data)
    tracking   MLflow backend, run, plots, report, registry  (uses data)
    tuning     Optuna storage, holdout, objective, study  (uses training, tracking)
    pipeline   Prefect task wrappers and the flows' decisions (uses all of the above)
"""
