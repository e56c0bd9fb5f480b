"""`nobs-amqp deploy kubernetes`'s options for what every pod gets: variables, Secrets and
ConfigMaps (as variables or files), image pull secrets, a service account, node selection,
tolerations, the user it runs as. Each option but the last three may be given several times."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from ..ops import pods
from ..ops.pods import Pod, Toleration, Volume


def _pairs(
    separator: str, shape: str
) -> Callable[[click.Context, click.Parameter, tuple[str, ...]], list[tuple[str, str]]]:
    """A callback reading `A<separator>B` values (each split at the first separator) into pairs."""

    def parse(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> list[tuple[str, str]]:
        pairs = []
        for value in values:
            left, found, right = value.partition(separator)
            if not found or not left or not right:
                raise click.BadParameter(f"{value!r} is not {shape}", ctx, param)
            pairs.append((left, right))
        return pairs

    return parse


def _env(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict[str, str]:
    """NAME=VALUE (VALUE may be empty); the last one given for a NAME wins."""
    env = {}
    for value in values:
        name, found, text = value.partition("=")
        if not found or not name:
            raise click.BadParameter(f"{value!r} is not NAME=VALUE", ctx, param)
        env[name] = text
    return env


def _tolerations(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> list[Toleration]:
    """KEY[=VALUE][:EFFECT]."""
    tolerations = []
    for value in values:
        taint, _, effect = value.partition(":")
        key, equals, text = taint.partition("=")
        if not key or (equals and not text) or (effect and effect not in pods.EFFECTS):
            raise click.BadParameter(
                f"{value!r} is not KEY[=VALUE][:EFFECT] with EFFECT one of {', '.join(pods.EFFECTS)}", ctx, param
            )
        tolerations.append(Toleration(key, text if equals else None, effect or None))
    return tolerations


_OPTIONS = [
    click.option(
        "--env", metavar="NAME=VALUE", multiple=True, callback=_env, help="A variable of every container (repeatable)."
    ),
    click.option(
        "--env-from-secret", metavar="SECRET", multiple=True, help="Every key of SECRET as a variable (repeatable)."
    ),
    click.option(
        "--env-from-configmap",
        metavar="CONFIGMAP",
        multiple=True,
        help="Every key of CONFIGMAP as a variable (repeatable).",
    ),
    click.option(
        "--secret-volume",
        metavar="SECRET:PATH",
        multiple=True,
        callback=_pairs(":", "SECRET:PATH"),
        help="Mount SECRET's keys as files in folder PATH, read-only (repeatable; e.g. a CA for amqps://...?cafile=).",
    ),
    click.option(
        "--configmap-volume",
        metavar="CONFIGMAP:PATH",
        multiple=True,
        callback=_pairs(":", "CONFIGMAP:PATH"),
        help="Mount CONFIGMAP's keys as files in folder PATH, read-only (repeatable).",
    ),
    click.option(
        "--image-pull-secret", metavar="SECRET", multiple=True, help="Pull the image with SECRET (repeatable)."
    ),
    click.option(
        "--service-account", metavar="NAME", help="Run as this ServiceAccount, its token mounted [none, no token]."
    ),
    click.option(
        "--node-selector",
        metavar="KEY=VALUE",
        multiple=True,
        callback=_pairs("=", "KEY=VALUE"),
        help="Only on nodes with this label (repeatable).",
    ),
    click.option(
        "--toleration",
        metavar="KEY[=VALUE][:EFFECT]",
        multiple=True,
        callback=_tolerations,
        help="Tolerate this taint (no VALUE: any value; no EFFECT: every effect; repeatable).",
    ),
    click.option(
        "--run-as-user",
        type=click.IntRange(min=1),
        default=pods.RUN_AS,
        show_default=True,
        help="The user id of every container (not root).",
    ),
    click.option(
        "--run-as-group",
        type=click.IntRange(min=1),
        default=pods.RUN_AS,
        show_default=True,
        help="The group id of every container, and of the files of its volumes.",
    ),
]


def pod_options(command: Callable[..., None]) -> Callable[..., None]:
    """The options above, on `command`."""
    for option in reversed(_OPTIONS):
        command = option(command)
    return command


def pod_from(
    *,
    env: dict[str, str],
    env_from_secret: tuple[str, ...],
    env_from_configmap: tuple[str, ...],
    secret_volume: list[tuple[str, str]],
    configmap_volume: list[tuple[str, str]],
    image_pull_secret: tuple[str, ...],
    service_account: str | None,
    node_selector: list[tuple[str, str]],
    toleration: list[Toleration],
    run_as_user: int,
    run_as_group: int,
    **unknown: Any,
) -> Pod:
    """The Pod the options describe (checked when the manifests are built)."""
    if unknown:
        raise TypeError(f"unknown pod options: {', '.join(unknown)}")
    volumes = [Volume(pods.SECRET, name, path) for name, path in secret_volume]
    volumes += [Volume(pods.CONFIGMAP, name, path) for name, path in configmap_volume]
    return Pod(
        env=env,
        env_from_secrets=env_from_secret,
        env_from_configmaps=env_from_configmap,
        volumes=volumes,
        image_pull_secrets=image_pull_secret,
        service_account=service_account,
        node_selector=dict(node_selector),
        tolerations=toleration,
        run_as_user=run_as_user,
        run_as_group=run_as_group,
    )
