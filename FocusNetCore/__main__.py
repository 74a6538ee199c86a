"""``python -m FocusNetCore`` (``PythonSlicer -m FocusNetCore`` inside Slicer)."""
import sys

from .cli import main

sys.exit(main())
