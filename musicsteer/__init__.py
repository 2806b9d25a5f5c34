"""musicsteer: a real-time engine that plays MusicGen live while a performer steers it."""

__version__ = "0.1.0"
