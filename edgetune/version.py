"""The version of edgetune: a module of its own, so that what records it (an exported step's
manifest) needs nothing else of the package."""
__version__ = "0.1.0"
