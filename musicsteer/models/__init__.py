"""Weights trained by this project (tools/), shipped as package data."""
