import subprocess
import sys


def test_slicer_side_modules_do_not_import_torch():
    """The Slicer process imports the catalogue, I/O and preprocessing; torch
    must stay out of it (DESIGN: inference runs in a subprocess)."""
    code = ("import sys, FocusNetCore, FocusNetCore.organs, FocusNetCore.imageio, FocusNetCore.preprocess, "
            "FocusNetCore.dicom, FocusNetCore.phantom, FocusNetCore.preview; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_cli_refuses_to_overwrite_with_exit_code_2(tmp_path):
    out = subprocess.run([sys.executable, "-m", "FocusNetCore", "phantom", "--out", str(tmp_path), "--format", "nrrd",
                          "--size", "small"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    again = subprocess.run([sys.executable, "-m", "FocusNetCore", "phantom", "--out", str(tmp_path), "--format", "nrrd",
                            "--size", "small"], capture_output=True, text=True)
    assert again.returncode == 2
    assert "already exists" in again.stderr and "phantom_0000_ct.nrrd" in again.stderr
