"""Latent priors: the CompVis LDM checkpoints (``ldm``) and the embedded demo prior (``toy``)."""
