"""The scoring model: conversations -> templated tokens -> backbone embeddings -> ArmoRM heads -> scores.

No gRPC, no protobuf, no I/O beyond loading weights. See docs/ARCHITECTURE.md.
"""
