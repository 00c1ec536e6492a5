"""rayinfer's built-in tasks. Each module is a plugin registered through the ``rayinfer``
entry-point group, exactly as a third-party plugin would be."""
