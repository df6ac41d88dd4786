"""
The secret-injecting HTTP reverse proxy.
"""
