"""stepcli: learned per-weight step sizes against a tuned Adam on MNIST."""

__version__ = "0.1.0"
