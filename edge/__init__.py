"""bastion.edge — the field node: sources, pipeline, event store, audit log, protocol, server, client.

(The daemon lands with the field-node issue; the package exists so the layout is fixed.)
"""
