"""pdm: Patched Diffusion Models, sampled fast with DPM-Solver and adaptive step skipping."""

__version__ = "0.1.0"
