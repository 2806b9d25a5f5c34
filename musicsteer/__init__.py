"""musicsteer: a real-time engine that plays MusicGen live while a performer steers it.

The Python API (README.md, "Python API"): `load_model`, `render_clip`, `start_live` and its
`LiveSession`, `Clip`, `ConceptPack`, `make_pack`, `train_pack`, `MusicsteerError`. They are
imported on first use, so `import musicsteer` stays light (no torch until a name is used).
The names differ from the package's modules on purpose: `musicsteer.render` and
`musicsteer.live` are modules, and importing a submodule rebinds its name on the package.
"""

__version__ = "0.1.0"

__all__ = [
    "load_model", "render_clip", "start_live", "LiveSession", "Clip", "StreamError",
    "ConceptPack", "make_pack", "train_pack", "MusicsteerError", "__version__",
]

_HOMES = {
    "load_model": "api", "render_clip": "api", "start_live": "api", "LiveSession": "api", "Clip": "api",
    "StreamError": "api", "make_pack": "api", "ConceptPack": "steering.pack", "train_pack": "probes.train",
    "MusicsteerError": "errors",
}


def __getattr__(name: str):
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'musicsteer' has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(f"{__name__}.{home}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
