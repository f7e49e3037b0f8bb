"""lstore: container image pull and OverlayFS storage engine."""
