"""`sslflow retrain`: the scheduled job, once: ingest `data/incoming` -> validate -> train if enough is new.

Trains (the `train` flow) when at least `pipeline.min_new_images` train images arrived since
the champion was trained, or with `--force`; otherwise says "nothing to do". Only one
retrain trains at a time (Prefect global concurrency limit `pipeline.lock`).

Exit codes: 0 trained or nothing to do, 4 skipped because another retrain holds the slot
(for `pipeline.lock_timeout_s`), 2 bad input, 3 a service is down, 1 anything else.
"""

from __future__ import annotations

import argparse
import sys

from sslflow.cli.commands.common import add_params_arguments, settings_from

EXIT_SKIPPED = 4


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("retrain", help="ingest data/incoming and retrain if enough new images arrived",
                       description=__doc__)
    p.add_argument("--incoming", help="folder of new images (default: pipeline.incoming, data/incoming)")
    p.add_argument("--store", help="image store (default: pipeline.store, data/store)")
    p.add_argument("--force", action="store_true", default=None, help="train whatever arrived")
    p.add_argument("--min-new-images", type=int, help="override pipeline.min_new_images")
    p.add_argument("--run-name", help="name of the run directory under runs/ (default: a timestamp)")
    add_params_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sslflow.core.project import run_name
    from sslflow.tasks.tracking.backend import check_tracking_server, resolve_tracking_uri

    settings = settings_from(args)  # bad settings: one line, before Prefect starts
    if args.run_name is not None:
        run_name(args.run_name)
    check_tracking_server(resolve_tracking_uri(settings), settings.tracking.preflight_timeout_s)

    from sslflow.cli.temporary_server import prefect_api
    from sslflow.flows.retrain import SKIPPED, retrain_flow

    with prefect_api():
        state = retrain_flow(incoming=args.incoming, store=args.store, params_files=args.params,
                             overrides=list(args.overrides), force=args.force, min_new_images=args.min_new_images,
                             run_name=args.run_name, project=str(settings.project), return_state=True)
    if state.name == SKIPPED:  # a Cancelled state: another run holds the slot
        print(f"retrain: {SKIPPED}: {state.message}", file=sys.stderr)
        return EXIT_SKIPPED
    result = state.result()
    if not result.get("trained"):
        print(f"retrain: {state.name}: {result['reason']}")
        return 0
    t = result["train"]
    print(f"retrain: trained ({result['reason']})")
    for key, value in t["metrics"].items():
        print(f"  {key:<14} {value:6.2f}")
    print(f"run directory: {t['run_dir']}\nregistry: {t['model_name']} version {t['model_version']}: "
          f"{t['decision']} ({t['reason']})")
    return 0
