"""The foundation every stage stands on: config, the distributed context, the one entry path and
stage table, errors, atomic io, locks, the network/shell policy, tracking and progress, the
shared file formats (shards, stores, images, provenance records) and the exact top-l kernel.
It imports nothing from the stages (pipeline/ stage 1, clustering/, training/, launch/)."""
