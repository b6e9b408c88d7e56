"""One module per command group; each exposes `register(subcommands)`.

Handlers import the heavy stack (torch, ray, pyarrow) inside themselves, never at module
level, so `cmacc --help` stays instant.
"""
