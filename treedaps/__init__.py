"""treedaps: diffusion-based Fourier phase retrieval with tree search.

LatentDAPS posterior sampling (explore), particle repulsion, diversity-aware pruning (prune) and
ReSample-style latent data consistency (refine). See README.md and PROJECT.md.
"""
__version__ = "0.1.0"
