"""
The appliance: one twistd process hosting several network services.
"""

__version__ = "0.1.0"
