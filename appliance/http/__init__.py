"""The shared HTTP forwarding engine: strict HTTP/1.1 parsing, streaming, upstream pools."""
