"""`sslflow deploy`: create the Prefect deployments (retrain on a cron schedule, train and tune
on demand; with --gpu also pretrain/gpu, train/gpu and tune/gpu on the GPU work pool).

Needs a Prefect server (`prefect server start`, then `PREFECT_API_URL=http://127.0.0.1:4200/api`;
the stack's server also needs `PREFECT_API_AUTH_STRING`: eval "$(infra/local-stack.sh env)").
The deployments point at the project directory (the current one, or --project /
SSLFLOW_PROJECT): flow runs work there and read its settings, store and runs. Their code is the
project's own when it is an sslflow checkout, else the sslflow installed where the worker runs.
The schedule, work pool names and GPU limit come from the project's settings (section pipeline).
Then run a worker that can read and write the project: `prefect worker start --pool sslflow-process`
(and one per GPU host: `--pool sslflow-gpu`). With --gpu, from a checkout, the same set as
`prefect deploy --all` with prefect.yaml. See docs/orchestration.md and docs/scaling-gpu-pool.md.
"""

from __future__ import annotations

import argparse

from sslflow.cli.commands.common import add_params_arguments, settings_from


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("deploy", help="create the Prefect deployments (scheduled retrain, on-demand train and tune)",
                       description=__doc__)
    p.add_argument("--gpu", action="store_true",
                   help="also pretrain/gpu, train/gpu and tune/gpu on pipeline.gpu_work_pool")
    add_params_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import os

    from sslflow.core.errors import UserError

    settings = settings_from(args)
    pp = settings.pipeline
    if not os.environ.get("PREFECT_API_URL"):
        from prefect.settings import PREFECT_API_URL

        if not PREFECT_API_URL.value():
            raise UserError("no Prefect server: start one (prefect server start) and set PREFECT_API_URL "
                            "(e.g. http://127.0.0.1:4200/api); a temporary server would forget the deployments")
    from sslflow.flows.deployments import deploy_all

    for name, dep_id in deploy_all(settings, gpu=args.gpu).items():
        print(f"deployment {name}: {dep_id}")
    from sslflow.flows.deployments import code_source

    src = code_source(settings.project)
    print(f"project: {settings.project} (flow runs work there); code: "
          + (f"the checkout {src}" if src else "the sslflow installed where the worker runs"))
    print(f"schedule: retrain/nightly at '{pp.cron}' ({pp.timezone}); start a worker: "
          f"prefect worker start --pool {pp.work_pool}")
    if args.gpu:
        print(f"GPU hosts: prefect worker start --pool {pp.gpu_work_pool} (in a checkout on each); pretrain there "
              "from the train flow with --set pipeline.pretrain_deployment=pretrain/gpu")
    return 0
