"""
Twisted plugins: the C{twistd appliance} command and the hosted services.

Kept to declarations: plugin discovery imports this module, so everything
heavy is imported only when used.
"""

from twisted.application.service import ServiceMaker

from appliance.host.plugin import ServicePlugin

appliance = ServiceMaker(
    "appliance",
    "appliance.tap",
    "Host the appliance's network services in one process.",
    "appliance",
)

echo = ServicePlugin(
    name="echo",
    module="appliance.echo.plugin",
    order=10,
    description="Line echo over TCP: the example of the service contract.",
)

pow_service = ServicePlugin(
    name="pow",
    module="appliance.pow.plugin",
    order=20,
    description="Proof-of-work TCP quote server.",
)

secretproxy = ServicePlugin(
    name="secretproxy",
    module="appliance.secretproxy.plugin",
    order=30,
    description="Secret-injecting HTTP reverse proxy.",
)
