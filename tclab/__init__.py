"""tclab: a research workbench for token caching (TokenCache) in diffusion transformers.

``import tclab`` is cheap: submodules load when used (``from tclab import runs``). ``tclab.explore``
is loaded on first access; it is both a module and a callable, ``tclab.explore(record)`` (the
JupyterLab widget) next to ``tclab.explore.static_explorer(record)`` (the kernel-free page).
``tclab.rate(run_folder)`` is the blind A/B rating widget of a run's images (``tclab.rating_widget``;
the rating set, the kernel-free page and the verdict are in ``tclab.rating``).
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "explore":  # lazily: it pulls in torch (via tclab.record); ipywidgets only when a widget is built
        import importlib

        return importlib.import_module(".explore", __name__)
    if name == "rate":  # lazily: the widget module; ipywidgets only when a widget is built
        import importlib

        return importlib.import_module(".rating_widget", __name__).rate
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
