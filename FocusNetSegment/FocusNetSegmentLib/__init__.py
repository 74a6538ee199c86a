"""Slicer-side logic of the FocusNet module that needs MRML but not Qt:
the scene bridge, the background segmentation process, the review session
with its timing, and export. Tested headless against the slicer-core wheel.
"""
