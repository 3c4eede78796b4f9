"""culign: cultural alignment of a frozen LLM with soft prompts (Masoud et al., 2025). The public API is
:mod:`culign.api`, re-exported here (docs/python.md): ``culign.evaluate``, ``culign.train``, ``culign.open_registry``."""
__version__ = "0.1.0"


def __getattr__(name: str):
    # the API on first use, not at `import culign`: the CLI and the service start without loading what they skip
    import importlib
    import importlib.util

    if name.startswith("__"):
        raise AttributeError(name)
    if importlib.util.find_spec(f"{__name__}.{name}") is not None:  # `from culign import http_limits` asks here
        return importlib.import_module(f"{__name__}.{name}")  # first: a submodule must not pull in the whole API
    api = importlib.import_module("culign.api")
    if name in api.__all__:
        return getattr(api, name)
    raise AttributeError(f"module 'culign' has no attribute {name!r}")


def __dir__():
    import importlib

    api = importlib.import_module("culign.api")
    return sorted([*globals(), *api.__all__])
