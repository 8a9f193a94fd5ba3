"""bastion.edge — the field node: sources, pipeline, event store, audit log, protocol, server (daemon), client (SDK).

Imports only numpy, OpenCV, onnxruntime (through bastion.runtime), pyzmq, pydantic and the standard library.
"""
