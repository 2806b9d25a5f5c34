"""Steering kernels (Triton on CUDA, a torch reference elsewhere) behind one dispatch.

The decoder's hook points (`MusicGen.set_hook`) are where they plug in.
"""
