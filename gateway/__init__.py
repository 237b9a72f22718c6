"""The Tiergate gateway: Open Inference Protocol v2 front door, routing policy and tier chain."""
