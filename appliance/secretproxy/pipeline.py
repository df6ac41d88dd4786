"""
The secret proxy's request pipeline, in the order of a request's life:

    route -> normalise -> rate limit -> authenticate -> authorize (+ audit)
    -> resolve secret -> vet the address -> bulkhead -> forward with injection

Each stage answers synchronously when it can (cache hits, in-memory limits)
and only then waits on a Deferred, so a warm request creates none. Any stage
may end the request with a short error that names nothing configured.
"""

from __future__ import annotations

import time
from typing import Any

from attrs import define
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from appliance.auth import AuthRequest, AuthResult, Identity
from appliance.host.log_throttle import LogThrottle
from appliance.host.tls import peer_identity
from appliance.http.errors import HTTPError
from appliance.http.exchange import IDEMPOTENT, Exchange, UpstreamPlan
from appliance.http.headers import VIA, dropped_fields
from appliance.http.normalize import normalize_target
from appliance.policy import PolicyDecision, PolicyInput
from appliance.resilience import BulkheadFull, rate_limit_headers
from appliance.secretproxy.config import SecretProxyConfig
from appliance.secretproxy.records import REQUEST_ID_FIELD, DecisionAudit, RequestIds, log_access
from appliance.secretproxy.routes import RouteTable, status_class, strip_query_param
from appliance.secretproxy.upstreams import UpstreamRuntime

# Credentials and routing fields the proxy owns: never forwarded from the client.
ALWAYS_DROPPED = frozenset({b"authorization", b"proxy-authorization", b"cookie",
                            b"x-session-secret", b"x-upstream-host", b"forwarded"})
UNAUTHORIZED = [(b"WWW-Authenticate", b'Bearer realm="secretproxy"')]
_VIA_LINE = b"Via: " + VIA


@define(slots=True, eq=False)
class RequestState:
    """What the stages learned about one request."""

    upstream: UpstreamRuntime
    path: str
    target: bytes
    identity: Identity | None = None
    secret_value: str = ""
    decision: str = "-"
    permit: Any = None
    refetched: bool = False
    request_id: bytes = b""


class Pipeline:
    """The L{appliance.http.server.RequestHandler} of the secret proxy."""

    log = Logger()

    def __init__(self, config: SecretProxyConfig, upstreams: dict[str, UpstreamRuntime],
                 policy: Any, secrets: Any, limits: Any, metrics: Any, audit: Any,
                 clock: Any, warnings: LogThrottle | None = None) -> None:
        self.config = config
        self.upstreams = upstreams
        self.routes = RouteTable(config.upstreams)
        self.policy = policy
        self.secrets = secrets
        self.limits = limits
        self.metrics = metrics
        self.clock = clock
        # Failures that repeat per request (a store or an upstream down) are
        # throttled: the service keeps one across reloads and flushes it at stop.
        self.warnings = warnings if warnings is not None else LogThrottle(self.log, clock)
        self.route_header = config.route_header
        self.session_header = config.auth.session_header
        self.request_ids = RequestIds()
        self.decisions = None if audit is None else DecisionAudit(audit, self._audit_failed)
        self._proto_line = b"X-Forwarded-Proto: " + (b"https" if config.tls else b"http")

    # -- stage 1: route and normalise ------------------------------------------------

    def handle(self, exchange: Exchange) -> None:
        """Start a request's life."""
        head = exchange.head
        request_id = self.request_ids.for_request(head)
        exchange.response_headers = ((REQUEST_ID_FIELD, request_id),)
        if head.repeated and (self.route_header in head.repeated
                              or self.session_header in head.repeated):
            exchange.respond_error(400, "repeated routing or credential header")
            return
        try:
            if head.target[:1] != b"/":
                raise HTTPError(400, "only origin-form request targets are accepted")
            normalized, query = normalize_target(head.target, self.config.max_head)
            named = head.get(self.route_header)
            if named is not None:
                config = self.routes.by_header(named)
            else:
                found = self.routes.by_path(normalized.path)
                config = None
                if found is not None:
                    config, rest = found
                    normalized, _ = normalize_target(rest.encode("utf-8"))
            if config is None:
                raise HTTPError(403, "no such upstream")
            path = normalized.wire.decode("ascii")  # policy decides on what is sent
            upstream = self.upstreams[config.name]
            if config.injection.kind == "query":
                query = strip_query_param(query, config.injection.query_param)
            target = normalized.target(query)
        except HTTPError as error:
            self.metrics.refused("unknown_upstream" if error.status == 403 else "bad_request")
            exchange.respond_error(error.status, error.reason)
            return
        state = RequestState(upstream=upstream, path=path, target=target,
                             request_id=request_id)
        exchange.attributes["state"] = state
        exchange.attributes["upstream"] = config.name
        self._limit(exchange, state, None, self._authenticate)

    # -- stage 2: rate limits -----------------------------------------------------

    def _limit(self, exchange: Exchange, state: RequestState, identity: str | None,
               then: Any) -> None:
        result = self.limits.check(state.upstream.config.name, identity)
        if result is None:  # admitted at once: the exchange is still ours
            then(exchange, state)
        elif type(result) is tuple or not isinstance(result, Deferred):  # an ABC: slow
            self._limited(result, exchange, state, then)
        else:
            result.addCallback(self._limited, exchange, state, then)
            result.addErrback(self._failed, exchange, "rate limit")

    def _limited(self, result: Any, exchange: Exchange, state: RequestState,
                 then: Any) -> None:
        if exchange.finished:
            return
        if result is None:
            then(exchange, state)
            return
        scope, verdict = result
        self.metrics.rate_limited(scope)
        headers = [(name.encode("ascii"), value.encode("ascii"))
                   for name, value in rate_limit_headers(verdict).items()]
        exchange.respond_error(429, f"rate limited ({scope})", headers)

    # -- stage 3: authenticate ----------------------------------------------------

    def _authenticate(self, exchange: Exchange, state: RequestState) -> None:
        head = exchange.head
        transport = exchange.server.transport
        request = AuthRequest(headers=head.fields,
                              peer_identity=peer_identity(transport) if self.config.tls
                              else None,
                              peer_address="")
        authenticator = state.upstream.authenticator
        result = authenticator.authenticate_now(request)
        if result is not None:
            self._authenticated(result, exchange, state)
            return
        d = authenticator.authenticate(request)
        d.addCallback(self._authenticated, exchange, state)
        d.addErrback(self._failed, exchange, "authentication")

    def _authenticated(self, result: AuthResult, exchange: Exchange,
                       state: RequestState) -> None:
        if exchange.finished:
            return
        if result.identity is None:
            if result.failure == "unavailable":
                self.metrics.refused("auth_unavailable")
                exchange.respond_error(503, "authentication unavailable")
            else:
                self.metrics.refused("unauthenticated")
                exchange.respond_error(401, f"authentication {result.failure}", UNAUTHORIZED)
            return
        state.identity = result.identity
        if self.config.identity_rate_limit is None:
            self._authorize(exchange, state)
        else:
            self._limit(exchange, state, result.identity.name, self._authorize)

    # -- stage 4: authorize (and audit the decision) --------------------------------

    def _authorize(self, exchange: Exchange, state: RequestState) -> None:
        identity = state.identity
        assert identity is not None
        question = PolicyInput(identity=identity.name, upstream=state.upstream.config.name,
                               method=exchange.head.method.decode("ascii"), path=state.path,
                               namespace=identity.namespace,
                               service_account=identity.service_account)
        started = time.perf_counter()
        decision = self.policy.decide_now(question)
        if decision is not None:
            self._decided(decision, exchange, state, started)
            return
        d = self.policy.decide(question)
        d.addCallback(self._decided, exchange, state, started)
        d.addErrback(self._failed, exchange, "policy")

    def _decided(self, decision: PolicyDecision, exchange: Exchange, state: RequestState,
                 started: float) -> None:
        duration = time.perf_counter() - started
        identity = state.identity
        assert identity is not None
        state.decision = "allow" if decision.allowed else "deny"
        audited = self.decisions is None or self.decisions.record(
            state.request_id, identity.name, state.upstream.config.name, exchange.head.method,
            state.decision, decision.reason, decision.source, duration)
        if exchange.finished:
            return
        if not decision.allowed:
            self.metrics.refused("policy_denied")
            exchange.respond_error(403, "denied by policy")
            return
        if not audited and self.config.on_audit_failure == "deny":
            # Every allowed request is on record, or it does not happen.
            self.metrics.refused("audit_unavailable")
            exchange.respond_error(503, "audit unavailable")
            return
        self._resolve_secret(exchange, state)

    # -- stage 5: the secret --------------------------------------------------------

    def _resolve_secret(self, exchange: Exchange, state: RequestState) -> None:
        name = state.upstream.config.secret
        value = self.secrets.get_now(name)
        if value is not None:
            self._with_secret(value, exchange, state)
            return
        d = self.secrets.get(name)
        d.addCallback(self._with_secret, exchange, state)
        d.addErrback(self._secret_failed, exchange)

    def _secret_failed(self, failure: Failure, exchange: Exchange) -> None:
        if exchange.finished:
            return
        self.metrics.refused("secret_unavailable")
        upstream = exchange.attributes.get("upstream")
        self.warnings.warn(("secret", upstream),
                           "secretproxy: secret unavailable for upstream {upstream}: {error}",
                           upstream=upstream, error=failure.getErrorMessage())
        exchange.respond_error(503, "secret unavailable")

    def _with_secret(self, value: Any, exchange: Exchange, state: RequestState) -> None:
        if exchange.finished:
            return
        state.secret_value = value.value
        self._vet_address(exchange, state)

    # -- stage 6: the address -------------------------------------------------------

    def _vet_address(self, exchange: Exchange, state: RequestState) -> None:
        config = state.upstream.config
        host = config.address or config.host
        addresses = state.upstream.resolver.vetted_now(host, config.port)
        if addresses is not None:
            self._with_addresses(addresses, exchange, state)
            return
        d = state.upstream.resolver.resolve(host, config.port)
        d.addCallback(self._with_addresses, exchange, state)
        d.addErrback(self._egress_failed, exchange)

    def _egress_failed(self, failure: Failure, exchange: Exchange) -> None:
        if exchange.finished:
            return
        self.metrics.refused("egress_refused")
        upstream = exchange.attributes.get("upstream")
        self.warnings.warn(("egress", upstream),
                           "secretproxy: upstream {upstream} address refused: {error}",
                           upstream=upstream, error=failure.getErrorMessage())
        exchange.respond_error(502, "upstream address refused")

    def _with_addresses(self, addresses: list[Any], exchange: Exchange,
                        state: RequestState) -> None:
        if exchange.finished:
            return
        exchange.attributes["address"] = state.upstream.address_text(addresses[0])
        permit = state.upstream.bulkhead.try_acquire()
        if permit is not None:
            self._forward(permit, exchange, state)
            return
        d = state.upstream.bulkhead.acquire()
        d.addCallback(self._forward, exchange, state)
        d.addErrback(self._bulkhead_full, exchange)

    def _bulkhead_full(self, failure: Failure, exchange: Exchange) -> None:
        failure.trap(BulkheadFull)
        if exchange.finished:
            return
        self.metrics.refused("bulkhead_full")
        exchange.respond_error(503, "upstream busy")

    # -- stage 7: forward with injection ---------------------------------------------

    def _forward(self, permit: Any, exchange: Exchange, state: RequestState) -> None:
        if exchange.finished:
            permit.release()
            return
        state.permit = permit
        try:
            plan = self._plan(exchange, state)
        except HTTPError as error:
            self.metrics.refused("injection_refused")
            exchange.respond_error(error.status, error.reason)
            return
        exchange.forward(plan)

    def _plan(self, exchange: Exchange, state: RequestState) -> UpstreamPlan:
        upstream = state.upstream
        config = upstream.config
        head = exchange.head
        query, header_line = upstream.injection(state.secret_value)
        target = state.target
        if query is not None:
            target += (b"&" if b"?" in target else b"?") + query
        lines = [head.method + b" " + target + b" HTTP/1.1", upstream.host_line]
        if header_line is not None:
            lines.append(header_line)
        drop = dropped_fields(head, upstream.drop)
        lines += [name + b": " + value for name, value in head.headers if name not in drop]
        lines.append(b"X-Forwarded-For: " + exchange.server.peer_host)
        lines.append(self._proto_line)
        host_header = head.fields.get(b"host")
        if host_header is not None:
            lines.append(b"X-Forwarded-Host: " + host_header)
        lines.append(_VIA_LINE)
        lines.append(REQUEST_ID_FIELD + b": " + state.request_id)
        retry_ok = head.method in IDEMPOTENT and head.content_length in (None, 0) \
            and not head.chunked
        return UpstreamPlan(
            target=upstream.target(exchange.attributes["address"]),
            head=lines,
            response_timeout=config.response_timeout,
            total_timeout=config.total_timeout,
            retries=config.retries if retry_ok else 0,
            gzip=config.gzip,
            on_response_head=self._on_response_head if retry_ok else None,
            masks=upstream.masks(state.secret_value),
        )

    def _on_response_head(self, exchange: Exchange, head: Any) -> Any:
        """On an upstream 401, fetch the secret once more; retry if it changed."""
        state: RequestState = exchange.attributes["state"]
        if head.status != 401 or state.refetched:
            return None
        state.refetched = True
        name = state.upstream.config.secret
        before = state.secret_value
        d = self.secrets.refetch(name)

        def fetched(value: Any) -> UpstreamPlan | None:
            if value.value == before or exchange.finished:
                return None
            state.secret_value = value.value
            self.metrics.secret_refetched()
            return self._plan(exchange, state)

        d.addCallback(fetched)
        d.addErrback(lambda _: None)
        return d

    # -- endings --------------------------------------------------------------------

    def completed(self, exchange: Exchange) -> None:
        """Release the slot; record the request's metrics."""
        state: RequestState | None = exchange.attributes.get("state")
        upstream = "-"
        if state is not None:
            upstream = state.upstream.config.name
            if state.permit is not None:
                state.permit.release()
                state.permit = None
            state.secret_value = ""
        duration = self.clock.seconds() - exchange.started
        self.metrics.request(upstream, status_class(exchange.status or 499), duration,
                             exchange.upstream_seconds)
        if self.config.access_log and state is not None:
            identity = state.identity
            log_access(exchange.head.method, state.path, exchange.status or 499, upstream,
                       identity.name if identity is not None else "-", state.decision,
                       duration, exchange.upstream_seconds, exchange.response_bytes,
                       exchange.server.peer_host, state.request_id)
        if exchange.failure:
            self.metrics.upstream_failed(upstream, exchange.failure)
            request_id = state.request_id.decode("ascii") if state is not None else ""
            self.warnings.warn(("upstream", upstream, exchange.failure),
                               "secretproxy: upstream {upstream}: {reason}", upstream=upstream,
                               reason=exchange.error_reason, request_id=request_id)

    def _failed(self, failure: Failure, exchange: Exchange, stage: str) -> None:
        self.log.failure("secretproxy: {stage} failed unexpectedly", failure, stage=stage)
        if not exchange.finished:
            exchange.respond_error(500, f"{stage} failed")

    def _audit_failed(self, failure: Failure) -> None:
        self.metrics.audit_failed()
        self.warnings.error("audit", "secretproxy: audit write failed: {error}",
                            error=failure.getErrorMessage())
