"""FocusNetCore: FocusNetv2 segmentation of head-and-neck organs at risk on CT.

Pure Python (numpy, SimpleITK, pydicom; torch only in the model, training and
inference modules). Importing this package never imports torch, Slicer or Qt,
so the Slicer process can use the organ catalogue, image I/O and metrics.
"""

__version__ = "0.1.0"
