"""`nobs-amqp deploy`: the manifests that run the project's workers, on Kubernetes or with Compose."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import click

from ..errors import ConfigurationError
from ..ops import deploy as fleet
from ..ops.compose import compose as compose_file
from ..project import Project
from .common import app_reference, load_project
from .pod_options import pod_from, pod_options

INSTALL_HINT = "pip install 'nobs_amqp[deploy]'"


def per_worker(minimum: int) -> Callable[[click.Context, click.Parameter, tuple[str, ...]], dict[str | None, int]]:
    """A callback reading `N` (every worker) or `WORKER=N` (one worker), each given any number of
    times; the last one given for a worker wins."""

    def parse(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict[str | None, int]:
        parsed: dict[str | None, int] = {}
        for value in values:
            worker, _, number = value.rpartition("=")
            try:
                count = int(number)
            except ValueError:
                raise click.BadParameter(f"{value!r} is not N or WORKER=N", ctx, param) from None
            if count < minimum:
                raise click.BadParameter(f"{value!r}: N must be at least {minimum}", ctx, param)
            parsed[worker or None] = count
        return parsed

    return parse


def _common(command: Callable[..., None]) -> Callable[..., None]:
    """The options both targets share: what the containers run and how they stop."""
    for option in reversed(
        [
            click.option(
                "--metrics-port",
                type=click.IntRange(1, 65535),
                default=fleet.METRICS_PORT,
                show_default=True,
                help="Port of the workers' /metrics, /livez and /readyz (consume --metrics-port).",
            ),
            click.option(
                "--grace-period",
                type=click.FloatRange(min=0),
                help=f"Seconds running tasks get after SIGTERM (consume --grace-period); "
                f"the worker is killed {fleet.SHUTDOWN_MARGIN} s after it "
                f"[each worker's time limit, at least {fleet.GRACE_PERIOD:g}].",
            ),
        ]
    ):
        command = option(command)
    return command


@click.group()
def deploy() -> None:
    """Write the manifests that run every worker of the project (Kubernetes with KEDA, or Compose)."""


@deploy.command("kubernetes")
@click.option("--image", required=True, help="The container image with the project installed (registry/app:tag).")
@click.option("--namespace", help="Namespace of every object [kubectl's current one].")
@click.option("--secret", help="Secret holding the broker URL [<project>-rabbitmq].")
@click.option("--secret-key", default=fleet.URL_KEY, show_default=True, help="Its key holding NOBS_AMQP_URL.")
@click.option(
    "--keda-secret-key",
    help="Its key holding the one URL KEDA reads queue lengths with: amqp(s)://...vhost, or the management "
    "API's http(s)://.../vhost to count messages workers hold too [--secret-key].",
)
@_common
@click.option("--cpu", default="100m", show_default=True, help="CPU request per worker.")
@click.option("--memory", default="256Mi", show_default=True, help="Memory request per worker.")
@click.option("--memory-limit", help="Memory limit per container [--memory].")
@click.option("--cpu-limit", help="CPU limit per container [none: no throttling].")
@click.option(
    "--signing-secret-key",
    default=fleet.SIGNING_KEY_KEY,
    show_default=True,
    help="The Secret's key holding NOBS_AMQP_SIGNING_KEY; required: a pod does not start without it.",
)
@click.option("--no-signing", is_flag=True, help="The project does not sign: no NOBS_AMQP_SIGNING_KEY.")
@pod_options
@click.option(
    "--min-replicas",
    metavar="[WORKER=]N",
    multiple=True,
    callback=per_worker(0),
    help=f"KEDA's minimum (0 scales an idle worker away) [{fleet.MIN_REPLICAS}].",
)
@click.option(
    "--max-replicas",
    metavar="[WORKER=]N",
    multiple=True,
    callback=per_worker(1),
    help=f"KEDA's maximum [{fleet.MAX_REPLICAS}].",
)
@click.option(
    "--messages-per-replica",
    metavar="[WORKER=]N",
    multiple=True,
    callback=per_worker(1),
    help="Ready messages per replica KEDA scales to [the worker's prefetch].",
)
@click.option(
    "--output",
    "-o",
    type=click.Path(file_okay=False, path_type=Path),
    help="Write one file per object into this folder (made if missing) [stdout].",
)
@click.pass_obj
def deploy_kubernetes(
    app: str | None,
    /,
    image: str,
    namespace: str | None,
    secret: str | None,
    secret_key: str,
    keda_secret_key: str | None,
    metrics_port: int,
    grace_period: float | None,
    cpu: str,
    memory: str,
    memory_limit: str | None,
    cpu_limit: str | None,
    signing_secret_key: str,
    no_signing: bool,
    min_replicas: Mapping[str | None, int],
    max_replicas: Mapping[str | None, int],
    messages_per_replica: Mapping[str | None, int],
    output: Path | None,
    **pod: Any,
) -> None:
    """Per worker a Deployment, a KEDA ScaledObject and a PodDisruptionBudget; a TriggerAuthentication,
    a NetworkPolicy and a Job applying the topology; the scheduler and its budget if there are schedules.

    Create the Secret first: kubectl create secret generic <project>-rabbitmq --from-literal=url=amqp://...
    --from-literal=signing-key=... (or give --no-signing). Every pod passes Pod Security "restricted".
    """
    yaml = _yaml()
    reference = app_reference(app)
    project = load_project(reference)
    release = fleet.Release(
        app=reference,
        image=image,
        namespace=namespace,
        secret=secret,
        url_key=secret_key,
        keda_key=keda_secret_key,
        metrics_port=metrics_port,
        grace_period=grace_period,
        cpu=cpu,
        memory=memory,
        memory_limit=memory_limit,
        cpu_limit=cpu_limit,
        signing_key=None if no_signing else signing_secret_key,
        pod=pod_from(**pod),
        min_replicas=min_replicas,
        max_replicas=max_replicas,
        messages_per_replica=messages_per_replica,
    )
    manifests = _built(lambda: fleet.kubernetes(project, release))
    _warn_explicit_url(project, f"key {secret_key!r} of secret {release.secret_name(project)!r}")
    _warn(fleet.warnings(project, release))
    header = _header("kubernetes", reference)
    if output is None:
        click.echo(header + "---\n" + _dump(yaml, manifests), nl=False)
        return
    _write_each(yaml, header, manifests, output)


def _write_each(yaml: Any, header: str, manifests: list[fleet.Manifest], output: Path) -> None:
    """One file per object in folder `output` (made if missing), numbered in the order to apply
    them; YAML files already there that this run did not write are named, never removed."""
    output.mkdir(parents=True, exist_ok=True)
    written: set[str] = set()
    for number, manifest in enumerate(manifests, 1):
        path = output / f"{number:02d}-{manifest['kind'].lower()}-{manifest['metadata']['name']}.yaml"
        path.write_text(header + _dump(yaml, [manifest]))
        written.add(path.name)
    click.echo(f"wrote {len(manifests)} manifest(s) to {output}", err=True)
    others = sorted(p.name for p in output.glob("*.yaml") if p.name not in written)
    if others:
        click.echo(f"left alone in {output}, not written now: {', '.join(others)}", err=True)


@deploy.command("compose")
@click.option("--image", help="The container image with the project installed [build the Dockerfile in .].")
@_common
@click.option(
    "--replicas", metavar="[WORKER=]N", multiple=True, callback=per_worker(0), help="Containers per worker [1]."
)
@click.option(
    "--env-file",
    help="File with NOBS_AMQP_URL for every service [the variable, from the shell or .env beside the Compose file].",
)
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path), help="Write it to this file [stdout].")
@click.pass_obj
def deploy_compose(
    app: str | None,
    image: str | None,
    metrics_port: int,
    grace_period: float | None,
    replicas: Mapping[str | None, int],
    env_file: str | None,
    output: Path | None,
) -> None:
    """A Compose file for one host: a service per worker, started after a one-shot `topology apply`.

    For `docker compose` (v2) and `docker-compose` 1.29 or later; without --image, the image is built once.
    """
    yaml = _yaml()
    reference = app_reference(app)
    project = load_project(reference)
    release = fleet.Release(
        app=reference,
        image=image,
        metrics_port=metrics_port,
        grace_period=grace_period,
        replicas=replicas,
        env_file=env_file,
    )
    built = _built(lambda: compose_file(project, release))
    _warn_explicit_url(project, f"{env_file}" if env_file else f"${fleet.URL_ENV}")
    _warn(fleet.warnings(project, release))
    text = _header("compose", reference) + _dump(yaml, [built])
    if output is None:
        click.echo(text, nl=False)
        return
    output.write_text(text)
    click.echo(f"wrote {output}", err=True)


def _built(build: Callable[[], Any]) -> Any:
    try:
        return build()
    except ConfigurationError as exc:
        raise click.UsageError(str(exc)) from None


def _header(target: str, reference: str) -> str:
    return f"# written by nobs-amqp deploy {target} for {reference}\n"


def _warn(warnings: list[str]) -> None:
    for warning in warnings:
        click.echo(f"warning: {warning}", err=True)


def _warn_explicit_url(project: Project, source: str) -> None:
    """The containers set NOBS_AMQP_URL; a project built with Project(url=...) does not read it."""
    if project._url is not None:
        click.echo(
            f"warning: project {project.name!r} sets Project(url=...), so its workers use that URL and "
            f"not NOBS_AMQP_URL from {source}; leave url= out to take it from the environment",
            err=True,
        )


def _yaml() -> Any:
    """PyYAML, or a usage error saying how to install it."""
    try:
        return importlib.import_module("yaml")
    except ImportError:
        raise click.ClickException(f"deploy writes YAML with PyYAML, which is not installed: {INSTALL_HINT}") from None


def _dump(yaml: Any, documents: list[Any]) -> str:
    """YAML documents, block style, keys in the order written, every repeated dict written out in
    full (no &anchors: they are valid YAML, but not what a reviewer of a manifest expects)."""

    class Dumper(yaml.SafeDumper):  # type: ignore[misc]
        def ignore_aliases(self, data: Any) -> bool:
            return True

    text: str = yaml.dump_all(documents, Dumper=Dumper, sort_keys=False, default_flow_style=False, width=1000)
    return text
