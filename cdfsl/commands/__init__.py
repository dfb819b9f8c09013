"""``cdfsl`` subcommands, one module each.

A command module defines ``NAME``, ``HELP``, ``configure(parser)`` (adds its arguments to a
jsonargparse ``ArgumentParser``) and ``run(cfg) -> None``. The CLI discovers every module in
this package, so adding a command is adding a file.
"""
