"""Distributed generation: pipelines of stages (local or on the mesh) driven by a head session."""
