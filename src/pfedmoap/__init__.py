__version__ = '0.1.0'

# The method registry registers every method's options with config (config knows no method), so a
# config can be read as soon as the package is imported. Light: no torch.
from . import algorithms  # noqa: E402,F401
