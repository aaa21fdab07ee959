"""The admission webhooks over HTTPS: a thin aiohttp adapter around steer.control.admission.

Every decision is made by the pure functions in admission.py. This module reads the body,
looks up the pod's namespace labels, and maps failures to HTTP statuses:

- 400 `{"error": reason}`: the body is over 3 MiB, is not JSON, is nested too deeply to
  read, or is not an AdmissionReview v1 request. No decision was made; the API server
  applies the webhook's failurePolicy and logs the reason.
- 500 `{"error": ...}`: anything else (a failed namespace lookup, a bug), logged with its
  traceback. The server keeps serving the next request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from aiohttp import web

from steer.constants import WEBHOOK_MUTATE_PODS_PATH, WEBHOOK_VALIDATE_POLICIES_PATH
from steer.control import admission

log = logging.getLogger("steer.webhook")

# The API server's own request-body limit: an AdmissionReview is never larger unless the
# sender is not an API server.
MAX_BODY_BYTES = 3 * 1024 * 1024
HEALTHZ_PATH = "/healthz"
# Short enough that labelling a namespace takes effect for the next pods within seconds,
# long enough that a rollout of many pods costs one namespace read, not one per pod.
NAMESPACE_LABELS_TTL = 5.0
CERT_RELOAD_INTERVAL = 30.0

NamespaceLabels = Callable[[str], Awaitable[Mapping[str, str]]]
_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class _BadRequest(Exception):
    """The body cannot be an AdmissionReview at all (too large, not JSON)."""


@web.middleware
async def _error_responses(request: web.Request, handler: _Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except (_BadRequest, admission.MalformedReview) as exc:
        log.warning("%s %s: 400: %s", request.method, request.path, exc)
        return web.json_response({"error": str(exc)}, status=400)
    except RecursionError:
        # A review nested deeper than any API object is (JSON 1,000 levels deep): not a
        # review this webhook can answer, whichever step gave up on it.
        log.warning("%s %s: 400: nested too deeply", request.method, request.path)
        return web.json_response({"error": "body is nested too deeply"}, status=400)
    except web.HTTPException:
        raise  # the router's own answers (404, 405) are already right
    except Exception:
        log.exception("%s %s: 500", request.method, request.path)
        return web.json_response({"error": "internal error; see steer-control's log"}, status=500)


async def _read_review(request: web.Request) -> Any:
    # A declared length over the limit is refused before reading a byte; a chunked body is
    # cut off by client_max_size while it is read.
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise _BadRequest(f"body of {request.content_length} bytes exceeds {MAX_BODY_BYTES}")
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise _BadRequest(f"body exceeds {MAX_BODY_BYTES} bytes") from None
    try:
        return json.loads(body)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise _BadRequest(f"body is not JSON: {exc}") from None
    except RecursionError:
        raise _BadRequest("body is nested too deeply to be an AdmissionReview") from None


def build_app(namespace_labels: NamespaceLabels) -> web.Application:
    """The webhook routes; `namespace_labels(name)` returns a namespace's labels."""

    async def mutate_pods(request: web.Request) -> web.Response:
        review = await _read_review(request)
        labels = await namespace_labels(admission.request_namespace(review))
        return web.json_response(admission.review_pod(review, labels))

    async def validate_policies(request: web.Request) -> web.Response:
        return web.json_response(admission.review_policy(await _read_review(request)))

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[_error_responses])
    app.router.add_post(WEBHOOK_MUTATE_PODS_PATH, mutate_pods)
    app.router.add_post(WEBHOOK_VALIDATE_POLICIES_PATH, validate_policies)
    app.router.add_get(HEALTHZ_PATH, healthz)
    return app


async def serve_webhook(
    app: web.Application,
    host: str,
    port: int,
    cert: Path,
    key: Path,
    *,
    reload_interval: float = CERT_RELOAD_INTERVAL,
) -> web.AppRunner:
    """Serve `app` over TLS 1.2+ until the returned runner is cleaned up.

    The certificate and key are read again whenever either file changes (checked every
    `reload_interval` seconds): a mounted Secret is updated in place after cert-manager
    renews it, and a server that kept the old certificate would start failing every
    admission once that one expired. Port 0 picks a free port; see `runner.addresses`.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    reloading = asyncio.create_task(_reload_on_change(context, cert, key, reload_interval))

    async def stop_reloading(_: web.Application) -> None:
        reloading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reloading

    # Registered before setup, which freezes the application's signals.
    app.on_cleanup.append(stop_reloading)
    runner = web.AppRunner(app)
    try:
        await runner.setup()
        await web.TCPSite(runner, host, port, ssl_context=context).start()
    except BaseException:
        await runner.cleanup()
        await stop_reloading(app)  # a runner that never set up runs no cleanup signal
        raise
    return runner


def _identity(*paths: Path) -> tuple[tuple[int, int], ...]:
    # The kubelet replaces a Secret's files through a symlink swap: the inode changes even
    # when the modification time does not.
    return tuple((s.st_ino, s.st_mtime_ns) for s in (p.stat() for p in paths))


async def _reload_on_change(context: ssl.SSLContext, cert: Path, key: Path, every: float) -> None:
    """Load a changed certificate into the serving context. Each new connection takes the
    context's current certificate, so established ones are untouched."""
    seen = _identity(cert, key)
    while True:
        await asyncio.sleep(every)
        try:
            current = _identity(cert, key)
            if current == seen:
                continue
            context.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as exc:
            # Missing, or caught between writing the certificate and the key: the old pair
            # keeps serving, and the next check tries again.
            log.warning("webhook certificate not reloaded, keeping the current one: %s", exc)
            continue
        seen = current
        log.info("webhook certificate reloaded from %s", cert)


def ttl_cache(
    read: Callable[[str], Mapping[str, str]],
    ttl: float = NAMESPACE_LABELS_TTL,
    clock: Callable[[], float] = time.monotonic,
) -> NamespaceLabels:
    """`read` (blocking) run in a thread, its answers kept for `ttl` seconds.

    Failures are not cached: the next pod retries the read.
    """
    cache: dict[str, tuple[float, Mapping[str, str]]] = {}

    async def lookup(name: str) -> Mapping[str, str]:
        now = clock()
        hit = cache.get(name)
        if hit is not None and hit[0] > now:
            return hit[1]
        labels = await asyncio.to_thread(read, name)
        # Expired entries go, so deleted namespaces do not pile up.
        for stale in [k for k, (expires, _) in cache.items() if expires <= now]:
            del cache[stale]
        cache[name] = (clock() + ttl, labels)
        return labels

    return lookup


def kube_namespace_labels(api_client: Any, ttl: float = NAMESPACE_LABELS_TTL) -> NamespaceLabels:
    """Namespace labels read from the API server (`kubernetes.client.ApiClient`)."""
    from kubernetes import client

    core = client.CoreV1Api(api_client)

    def read(name: str) -> Mapping[str, str]:
        metadata = core.read_namespace(name).metadata
        return dict(metadata.labels or {}) if metadata is not None else {}

    return ttl_cache(read, ttl)
