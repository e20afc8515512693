"""The gRPC service: data plane (service), batcher, servicer (protobuf <-> plain types), server, metrics.

See docs/SERVING.md and docs/ARCHITECTURE.md.
"""
