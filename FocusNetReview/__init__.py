"""The browser review station of ``focusnet review`` (trame-slicer).

Installed with ``pip install focusnet[review]``; the review logic itself
(statuses, flags, timing, export) is FocusNetSegmentLib's, shared with the
3D Slicer module.
"""
