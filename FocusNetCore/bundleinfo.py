"""A model bundle's metadata without torch (DESIGN "Model bundle").

The Slicer process never imports torch, yet its panel shows the chosen
bundle's name and intended use. A bundle is a ``torch.save`` zip archive
whose ``data.pkl`` pickles a dict of plain values and tensors; this module
unpickles that dict with an unpickler that knows only the handful of globals
a tensor needs (``collections.OrderedDict``, ``torch._utils._rebuild_tensor_v2``
and the typed storages) and stands a placeholder in for every tensor, so
nothing is executed and no tensor data is read. Anything else in the pickle
is refused, as ``torch.load(weights_only=True)`` refuses it.

The weights' checksum is checked where the weights are used
(:func:`FocusNetCore.bundle.load_bundle`, in the inference process).
"""
from __future__ import annotations

import collections
import pickle
import zipfile
from pathlib import Path

# The storage classes torch.save writes for each dtype (torch/storage.py).
_STORAGES = {f"{kind}Storage" for kind in ("Float", "Double", "Half", "BFloat16", "Long", "Int", "Short", "Char",
                                           "Byte", "Bool", "ComplexFloat", "ComplexDouble", "Untyped")}


class BundleError(ValueError):
    """A model bundle that cannot be used; the message names the file."""

    def __init__(self, path, problem: str):
        super().__init__(f"{path}: {problem}")


class TensorPlaceholder:
    """Where the bundle holds a tensor: its shape only."""

    def __init__(self, shape):
        self.shape = tuple(shape)

    def __repr__(self) -> str:
        return f"TensorPlaceholder{self.shape}"


def _rebuild_tensor(storage, storage_offset, size, stride, *rest):
    return TensorPlaceholder(size)


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "torch" and name in _STORAGES:
            return name
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a model bundle")

    def persistent_load(self, pid):
        return None  # a storage: its bytes are never read


def read_bundle_metadata(path) -> dict:
    """The bundle's dict without its weights: format version, config, organs,
    small organs, checksum and provenance. Raises :class:`BundleError` for a
    missing, damaged or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise BundleError(path, "no such model bundle")
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
            if not pickles:
                raise BundleError(path, "not a FocusNet model bundle (no data.pkl in the archive)")
            payload = _MetadataUnpickler(archive.open(pickles[0])).load()
    except BundleError:
        raise
    except (zipfile.BadZipFile, pickle.UnpicklingError, EOFError, OSError, ValueError) as error:
        raise BundleError(path, f"not a readable FocusNet model bundle ({type(error).__name__}: "
                          f"{str(error).splitlines()[0][:200] if str(error) else ''})") from None
    if not isinstance(payload, dict) or "format_version" not in payload:
        raise BundleError(path, "not a FocusNet model bundle (no format_version)")
    return {k: v for k, v in payload.items() if k not in ("state_dict", "autoencoder")}


def describe_bundle(path) -> str:
    """One line for a panel: the bundle's name and its intended use."""
    provenance = read_bundle_metadata(path).get("provenance") or {}
    name = provenance.get("name") or Path(path).name
    use = provenance.get("intended_use")
    return f"{name}: {use}" if use else f"{name} (no intended use recorded)"


def embedded_model_path() -> Path:
    """The model shipped in the package (also the default of ``focusnet segment``)."""
    return Path(__file__).resolve().parent / "models" / "focusnet-phantom-cpu.pt"
