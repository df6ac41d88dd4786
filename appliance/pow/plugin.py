"""The pow service: wiring of config, engine, limiter, replay set, quotes and listener."""

from __future__ import annotations

from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric
from twisted.internet.defer import Deferred

from appliance.host.hosted import HostedService
from appliance.host.metrics import CallbackCollector
from appliance.host.plugin import ReloadNotSupported
from appliance.host.runtime import Runtime
from appliance.pow.challenge import ChallengeSigner
from appliance.pow.config import PowConfig, parse
from appliance.pow.difficulty import DifficultyController
from appliance.pow.engine import PowEngine, PowMetrics, memory_replay
from appliance.pow.quotes import QuoteAPI, QuoteSource
from appliance.pow.replay import RedisReplaySet
from appliance.pow.server import PowFactory
from appliance.resilience import BreakerPolicy, CircuitBreaker, MemoryLimiter, Quota, RedisLimiter

__all__ = ["parse", "build", "PowService"]


def make_limiter(config: PowConfig, runtime: Runtime) -> Any:
    """Per-client challenge limiter: in Redis when shared state is configured."""
    quota = Quota("gcra", config.rate_limit, config.rate_limit_burst)
    use_redis = runtime.redis is not None and config.limits_backend in ("auto", "redis")
    if use_redis:
        return RedisLimiter("pow", runtime.redis, runtime.clock, quota,
                            on_redis_error=config.on_redis_error, registry=runtime.metrics)
    return MemoryLimiter("pow", runtime.clock, quota, max_keys=100_000,
                         registry=runtime.metrics)


class PowService(HostedService):
    """The proof-of-work quote server."""

    def __init__(self, config: PowConfig, runtime: Runtime) -> None:
        super().__init__("pow", runtime)
        self.config = config
        metrics = PowMetrics(runtime.metrics)
        controller = DifficultyController(config.difficulty, runtime.clock)
        local_replay = memory_replay(config, runtime.clock)
        replay: Any = local_replay
        if runtime.redis is not None:
            replay = RedisReplaySet(runtime.redis, runtime.clock, local_replay,
                                    "deny" if config.on_redis_error == "deny" else "local")
        self.quotes = QuoteSource(config.quotes, runtime.metrics, runtime.clock,
                                  self._quote_api(config, runtime))
        self.limiter = make_limiter(config, runtime)
        self.engine = PowEngine(config, runtime.clock, controller, self.limiter, replay,
                                self.quotes, metrics)
        runtime.metrics.register(CallbackCollector(self._gauges))
        self.factory = PowFactory(self.engine, runtime.clock, self.tracker)
        self.listen(config.listen, self.factory, "tls" if config.tls else "tcp", tls=config.tls)

    def _quote_api(self, config: PowConfig, runtime: Runtime) -> QuoteAPI | None:
        if config.quotes_url is None:
            return None
        breaker = CircuitBreaker("pow-quotes", runtime.clock,
                                 BreakerPolicy(failure_threshold=3, failure_ratio=None,
                                               open_base=10.0, open_max=300.0),
                                 registry=runtime.metrics)
        return QuoteAPI(config.quotes_url, config.quotes_timeout, config.quotes_cache_ttl,
                        config.quotes_refresh, breaker, runtime.reactor)

    def startService(self) -> None:
        """Listen, then start refreshing quotes from the API (if any)."""
        super().startService()
        self.quotes.start()

    def close(self) -> None:
        """Stop the quote refresh after the drain."""
        self.quotes.stop()

    def _gauges(self) -> list[Metric]:
        return [
            GaugeMetricFamily("appliance_pow_connections", "Open pow connections.",
                              value=self.engine.connections),
            GaugeMetricFamily("appliance_pow_difficulty",
                              "Difficulty (leading zero bits) a quiet client gets now.",
                              value=self.engine.controller.global_difficulty()),
        ]

    def status(self) -> dict[str, Any]:
        """Listeners plus difficulty, load, quote source and limiter state."""
        status = super().status()
        controller = self.engine.controller
        status.update({
            "difficulty": controller.global_difficulty(),
            "load": round(controller.load(), 3),
            "tracked_clients": controller.tracked_clients,
            "current_key": self.config.current_key,
            "quotes": {"file": len(self.config.quotes), "api_pool": self.quotes.api_quotes,
                       "api": self.config.quotes_url is not None},
            "limiter": self.limiter.status(),
        })
        return status

    def reload(self, config: PowConfig) -> Deferred[None] | None:
        """Apply keys, difficulty, limits, timeouts and quotes; listen/tls need a restart."""
        if (config.listen, config.tls, config.quotes_url) != (
                self.config.listen, self.config.tls, self.config.quotes_url):
            raise ReloadNotSupported("pow listen, tls or quotes_url changed: restart to apply")
        engine = self.engine
        rebuild_limiter = (config.rate_limit, config.rate_limit_burst, config.limits_backend,
                           config.on_redis_error) != (
            self.config.rate_limit, self.config.rate_limit_burst, self.config.limits_backend,
            self.config.on_redis_error)
        self.config = config
        engine.config = config
        engine.signer = ChallengeSigner(config.key_bytes(), config.current_key)
        engine.controller.policy = config.difficulty
        self.quotes.local = config.quotes
        if rebuild_limiter:
            self.limiter = engine.limiter = make_limiter(config, self.runtime)
            self.log.info("pow: new rate limit {rate} in force", rate=str(config.rate_limit))
        return None


def build(config: Any, runtime: Runtime) -> PowService:
    """Build the pow service."""
    return PowService(config, runtime)
