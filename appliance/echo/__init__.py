"""
echo: a line echo service over TCP, the smallest real user of the service
contract (config, listeners, drain, reload, metrics, readiness).
"""
