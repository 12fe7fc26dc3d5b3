"""The package's version, in a module of its own: any module may import it without
importing the package's public API (and so without caring about import order). It is
written here, and pyproject.toml reads it from here (so installed metadata agrees)."""

__version__ = "0.1.0"
