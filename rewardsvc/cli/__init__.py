"""The `rewardsvc` command line (entry point: rewardsvc.cli.main:main). Subcommand modules import heavy
libraries (torch, transformers, grpc) inside their handlers, so that `rewardsvc --help` stays fast.
"""
