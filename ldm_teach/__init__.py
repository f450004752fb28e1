"""ldm_teach: Stable Diffusion from scratch, one readable file per part.

The book *Stable Diffusion from Scratch* builds this package chapter by chapter;
each module's docstring names the chapter that explains it.
"""
__version__ = "0.1.0"
