"""
pow: a TCP quote server that serves a quote only after the client has done
SHA-256 proof-of-work on an HMAC-signed, stateless challenge.
"""
