"""The `cmacc` command: the user's door to every layer (docs/architecture.md, "Layers").

`main` holds the parser and maps errors to exit codes; every other module is one command
group and exposes `register(subcommands)`. The command line may import any layer, but it
imports the heavy stack (torch, ray, pyarrow) only inside a handler, when the command runs,
so `cmacc --help` and the storage-only commands answer at once.
"""
