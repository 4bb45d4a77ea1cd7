"""Builders of the offline demo data (`mlcd data demo`, `mlcd data rice`): real images from
Debian packages written as img2dataset-layout shards. Not part of the foundation."""
