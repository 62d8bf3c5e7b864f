"""Save and restore params with the whole optimizer state (needs the
``checkpoint`` extra: ``pip install 'blrax[checkpoint]'``)."""

from blrax._src.integrations.checkpoint import restore_checkpoint, save_checkpoint

__all__ = ("restore_checkpoint", "save_checkpoint")
