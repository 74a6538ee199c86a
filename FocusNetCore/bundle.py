"""The model bundle: one file with everything inference needs (DESIGN "Model bundle").

It holds the format version, the network configuration (organ set with
label values, small organs, spacing, crop, chunk, normalisation, widths), the
weights, and provenance (data set, cases, validation metrics, date, code
version) with a SHA-256 checksum of the weights. It loads with
``torch.load(weights_only=True)``: a model file from elsewhere can never run
code.
"""
from __future__ import annotations

import datetime
import hashlib
import io
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from . import __version__
from .bundleinfo import BundleError  # noqa: F401  (torch-free: the Slicer side reads bundles too)
from .imageio import atomic_output
from .networks import FocusNetConfig, FocusNetV2

FORMAT_VERSION = 2  # 2: a fine head may be an ensemble (``members``); bundles without one are still written as 1


def weights_checksum(state_dict: Dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def non_finite_tensors(state_dict: Dict[str, torch.Tensor], prefix: str = "") -> List[str]:
    """Names of the floating-point tensors holding NaN or infinity."""
    return [prefix + name for name, t in state_dict.items()
            if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def save_bundle(model: FocusNetV2, path, provenance: Optional[dict] = None, overwrite: bool = False,
                autoencoder: Optional[nn.Module] = None, autoencoder_width: float = 1.0,
                postprocess: Optional[dict] = None, click_heads: Optional[dict] = None,
                fine_heads: Optional[dict] = None, anatomy: Optional[dict] = None) -> Path:
    """Write the bundle; ``autoencoder`` (the trained shape autoencoder) lets
    inference score how plausible each small organ's shape is;
    ``postprocess`` is the plan of FocusNetCore.postprocess; ``click_heads``
    the SOS-Net heads click-to-find uses (see with_click_heads), as
    load_bundle returns them; ``fine_heads`` the organs' fine heads
    (FocusNetCore.finesos, see with_fine_heads), as load_bundle returns
    them; ``anatomy`` the prior of FocusNetCore.fieldofview (where the
    organs lie relative to each other in the training cases). Refuses
    weights or a presence threshold that are not finite: such a model would
    draw nothing or anything, on every scan."""
    bad = non_finite_tensors(model.state_dict())
    if autoencoder is not None:
        bad += non_finite_tensors(autoencoder.state_dict(), "autoencoder.")
    for organ, head in (click_heads or {}).items():
        bad += non_finite_tensors(head["state_dict"], f"click_heads.{organ}.")
    for organ, head in (fine_heads or {}).items():
        bad += non_finite_tensors(head["state_dict"], f"fine_heads.{organ}.")
    if not math.isfinite(float(model.config.heatmap_threshold)):
        bad.append(f"heatmap_threshold = {model.config.heatmap_threshold}")
    if bad:
        raise BundleError(path, f"refusing to write a model with non-finite values: {', '.join(bad[:5])}"
                          f"{f' and {len(bad) - 5} more' if len(bad) > 5 else ''}")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    organs = model.config.organs
    payload = {
        "format_version": FORMAT_VERSION if any("members" in head for head in (fine_heads or {}).values()) else 1,
        "config": model.config.to_dict(),
        "organs": {name: organs.label_of(name) for name in organs.names},
        "small_organs": list(organs.small_names),
        "state_dict": state,
        "checksum": weights_checksum(state),
        "provenance": {"code_version": __version__, "date": datetime.date.today().isoformat(),
                       **(provenance or {})},
    }
    if postprocess is not None:
        payload["postprocess"] = postprocess
    if anatomy is not None:
        payload["anatomy"] = anatomy
    if autoencoder is not None:
        aae_state = {k: v.detach().cpu().contiguous() for k, v in autoencoder.state_dict().items()}
        payload["autoencoder"] = {"width": float(autoencoder_width), "state_dict": aae_state,
                                  "checksum": weights_checksum(aae_state)}
    if click_heads:
        payload["click_heads"] = {organ: _click_head_entry(head) for organ, head in click_heads.items()}
    if fine_heads:
        payload["fine_heads"] = {organ: {**_click_head_entry(head), **fine_settings(head)}
                                 for organ, head in fine_heads.items()}
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    with atomic_output(Path(path), overwrite) as tmp:
        tmp.write_bytes(buffer.getvalue())
    return Path(path)


def load_bundle(path, map_location="cpu") -> Tuple[FocusNetV2, dict]:
    """Rebuild the model from the bundle alone; returns (model in eval mode, metadata)."""
    path = Path(path)
    if not path.is_file():
        raise BundleError(path, "no such model bundle")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # truncated, corrupt, or holding code
        raise BundleError(path, f"not a readable FocusNet model bundle ({type(error).__name__}: "
                          f"{str(error).splitlines()[0][:200]})") from None
    if not isinstance(payload, dict) or "format_version" not in payload:
        raise BundleError(path, "not a FocusNet model bundle (no format_version)")
    if payload["format_version"] > FORMAT_VERSION:
        raise BundleError(path, f"bundle format {payload['format_version']} is newer than this FocusNet "
                          f"understands ({FORMAT_VERSION}); update FocusNet")
    state = payload["state_dict"]
    if weights_checksum(state) != payload.get("checksum"):
        raise BundleError(path, "weights checksum mismatch: the file was altered or damaged")
    aae = payload.get("autoencoder")
    if aae is not None and weights_checksum(aae["state_dict"]) != aae.get("checksum"):
        raise BundleError(path, "autoencoder weights checksum mismatch: the file was altered or damaged")
    config = FocusNetConfig.from_dict(payload["config"])
    model = FocusNetV2(config)
    model.load_state_dict(state)
    model.eval()
    click_heads = payload.get("click_heads") or {}
    for organ, head in click_heads.items():
        if organ not in config.organs.small_names:
            raise BundleError(path, f"a click-to-find head for {organ!r}, which is not one of its small organs")
        if weights_checksum(head["state_dict"]) != head.get("checksum"):
            raise BundleError(path, f"click-to-find head {organ}: weights checksum mismatch: the file was altered "
                              "or damaged")
        try:
            click_head(config, organ, head["state_dict"])
        except RuntimeError as error:
            raise BundleError(path, f"click-to-find head {organ} does not fit its network: "
                              f"{str(error).splitlines()[0][:200]}") from None
    for organ, head in (payload.get("fine_heads") or {}).items():
        if organ not in config.organs.names:
            raise BundleError(path, f"a fine head for {organ!r}, which is not one of its organs")
        if weights_checksum(head["state_dict"]) != head.get("checksum"):
            raise BundleError(path, f"fine head {organ}: weights checksum mismatch: the file was altered or damaged")
        try:
            fine_head(config, head)
        except (RuntimeError, KeyError, TypeError, ValueError) as error:
            raise BundleError(path, f"fine head {organ} does not fit its network: "
                              f"{str(error).splitlines()[0][:200]}") from None
    meta = {k: v for k, v in payload.items() if k not in ("state_dict", "autoencoder")}
    meta["checksum"] = payload["checksum"]
    if aae is not None:
        meta["autoencoder_state"] = aae["state_dict"]
        meta["autoencoder_width"] = aae["width"]
    return model, meta


def with_postprocess(path, plan: dict, out, overwrite: bool = False,
                     sos_thresholds: Optional[Tuple[float, ...]] = None,
                     snet_small: Optional[Tuple[str, ...]] = None,
                     chunk_slices: Optional[int] = None) -> Path:
    """A copy of the bundle at ``path`` with the post-processing ``plan`` and,
    if given, SOS-Net's thresholds, the small organs S-Net draws and the
    slices per inference chunk (weights, checksums and provenance
    unchanged), written atomically."""
    load_bundle(path)  # refuses a damaged or altered bundle
    payload = torch.load(Path(path), map_location="cpu", weights_only=True)
    payload["postprocess"] = plan
    calibrated = {"sos_thresholds": sos_thresholds, "snet_small": snet_small}
    calibrated = {k: list(v) for k, v in calibrated.items() if v is not None}
    if chunk_slices is not None:
        calibrated["preprocess"] = {**payload["config"]["preprocess"], "chunk_slices": int(chunk_slices)}
    if calibrated:
        payload["config"] = FocusNetConfig.from_dict({**payload["config"], **calibrated}).to_dict()
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    with atomic_output(Path(out), overwrite) as tmp:
        tmp.write_bytes(buffer.getvalue())
    return Path(out)


def donor_heads(path, base: FocusNetV2, organs_to_donors: Dict[str, str]):
    """Per organ of ``organs_to_donors`` (small organ name -> bundle path):
    (index k, the donor's SOS-Net head k state, its threshold, provenance
    entry). A donor must share ``base``'s S-Net and SOL-Net weights exactly:
    a head only fits the features it was trained on."""
    organs = base.config.organs
    state = base.state_dict()
    shared = [name for name in state if not name.startswith("sosnet.")]
    out, loaded = {}, {}
    for organ, donor_path in organs_to_donors.items():
        if organ not in organs.small_names:
            raise BundleError(path, f"{organ!r} is not one of the small organs ({', '.join(organs.small_names)})")
        key = str(donor_path)
        if key not in loaded:
            donor, donor_meta = load_bundle(donor_path)
            if donor.config.organs.names != organs.names or donor.config.roi_size != base.config.roi_size:
                raise BundleError(donor_path, f"its organs or ROI differ from {path}'s")
            donor_state = donor.state_dict()
            if set(donor_state) != set(state) or any(not torch.equal(state[n], donor_state[n]) for n in shared):
                raise BundleError(donor_path, f"its S-Net or SOL-Net weights differ from {path}'s: an SOS-Net "
                                  "head only fits the features it was trained on")
            loaded[key] = donor, donor_meta
        donor, donor_meta = loaded[key]
        k = organs.small_names.index(organ)
        prefix = f"sosnet.heads.{k}."
        head = {name[len(prefix):]: t for name, t in donor.state_dict().items() if name.startswith(prefix)}
        out[organ] = (k, head, donor.config.sos_threshold(k),
                      {"bundle": Path(donor_path).name, "checksum": donor_meta["checksum"]})
    return out


def _resave(base: FocusNetV2, base_meta: dict, out, overwrite: bool, provenance: dict,
            click_heads: Optional[dict]) -> Path:
    autoencoder = None
    if "autoencoder_state" in base_meta:
        from .networks import ShapeAutoencoder

        autoencoder = ShapeAutoencoder(base.config.roi_size, width=base_meta["autoencoder_width"])
        autoencoder.load_state_dict(base_meta["autoencoder_state"])
    return save_bundle(base, out, provenance=provenance, overwrite=overwrite, autoencoder=autoencoder,
                       autoencoder_width=base_meta.get("autoencoder_width", 1.0),
                       postprocess=base_meta.get("postprocess"), click_heads=click_heads,
                       fine_heads=base_meta.get("fine_heads"), anatomy=base_meta.get("anatomy"))


def _kept_provenance(meta: dict) -> dict:
    return {k: v for k, v in meta["provenance"].items() if k not in ("code_version", "date")}


def with_sos_heads(path, donors: Dict[str, str], out, overwrite: bool = False, note: str = "") -> Path:
    """A copy of the bundle at ``path`` whose SOS-Net head for each organ in
    ``donors`` (small organ name -> bundle path), with that head's
    threshold, comes from the donor bundle; written atomically.

    Each small organ has its own SOS-Net head, fed by S-Net's features and
    the CT, so a head can move between bundles only where S-Net and SOL-Net
    are the very same weights (a bundle trained further from this one at its
    ``sos`` stage, ``focusnet train --from-model --from-stage sos``): anything
    else is refused. Post-processing plan, autoencoder and click-to-find
    heads are ``path``'s own; the provenance records where each head came
    from (``note``: how the donor was made, how the heads were chosen)."""
    base, base_meta = load_bundle(path)
    state = base.state_dict()
    thresholds = [base.config.sos_threshold(k) for k in range(len(base.config.organs.small_names))]
    taken = {}
    for organ, (k, head, threshold, source) in donor_heads(path, base, donors).items():
        for name, tensor in head.items():
            state[f"sosnet.heads.{k}.{name}"] = tensor
        thresholds[k] = threshold
        taken[organ] = {**source, **({"note": note} if note else {})}
    base.load_state_dict(state)
    base.config = FocusNetConfig.from_dict({**base.config.to_dict(), "sos_thresholds": thresholds})
    provenance = _kept_provenance(base_meta)
    provenance["sos_heads_from"] = {**provenance.get("sos_heads_from", {}), **taken}
    return _resave(base, base_meta, out, overwrite, provenance, base_meta.get("click_heads"))


def with_click_heads(path, heads: Dict[str, Tuple[str, float]], out, overwrite: bool = False,
                     note: str = "", scores: Optional[Dict[str, dict]] = None) -> Path:
    """A copy of the bundle at ``path`` that answers click-to-find (``focusnet
    worker``'s ``refine``) for each organ of ``heads`` (small organ name ->
    (donor bundle path, probability threshold)) with the donor's SOS-Net
    head for that organ; written atomically.

    The pipeline's own heads are trained and chosen for ROIs centred where
    SOL-Net points, with its error; a click lands near the organ's true
    centre, where a head trained with less ROI-centre noise can do better
    (issue 22). The segmentation itself is unchanged: only ``refine`` uses
    these. Donors must share ``path``'s S-Net and SOL-Net (as for
    with_sos_heads). The copy's click-to-find heads are exactly these (any
    ``path`` had are dropped). ``scores``: per organ, how the head was
    chosen (stored in its entry)."""
    base, base_meta = load_bundle(path)
    donors = {organ: donor for organ, (donor, _) in heads.items()}
    click = {}  # exactly these: any the bundle had are replaced
    for organ, (k, head, _, source) in donor_heads(path, base, donors).items():
        threshold = float(heads[organ][1])
        if not 0.0 < threshold < 1.0:
            raise BundleError(path, f"click-to-find threshold for {organ} must lie in (0, 1), got {threshold}")
        click[organ] = {"state_dict": head, "threshold": threshold,
                        "from": {**source, **({"note": note} if note else {}),
                                 **({"chosen_on": scores[organ]} if scores and organ in scores else {})}}
    return _resave(base, base_meta, out, overwrite, _kept_provenance(base_meta), click)


def click_head(config: FocusNetConfig, organ: str, state_dict: Dict[str, torch.Tensor]) -> nn.Module:
    """SOS-Net's head for ``organ`` under ``config``, holding ``state_dict``
    (a click-to-find head), in eval mode; raises RuntimeError if the weights
    do not fit."""
    from .networks import SOSNet

    head = SOSNet(config).heads[config.organs.small_names.index(organ)]
    head.load_state_dict(state_dict, strict=True)
    return head.eval()


def _click_head_entry(head: dict) -> dict:
    state = {k: v.detach().cpu().contiguous() for k, v in head["state_dict"].items()}
    return {"state_dict": state, "checksum": weights_checksum(state), "threshold": float(head["threshold"]),
            "from": dict(head.get("from") or {})}


FINE_SETTINGS = ("zoom", "roi", "width", "blocks")


def fine_settings(entry: dict) -> dict:
    """A fine head entry's settings (FINE_SETTINGS, and ``members`` for an
    ensemble: each member's width and blocks)."""
    settings = {k: entry[k] for k in FINE_SETTINGS}
    if "members" in entry:
        settings["members"] = [{"width": int(m["width"]), "blocks": int(m["blocks"])} for m in entry["members"]]
    return settings


def fine_head(config: FocusNetConfig, entry: dict) -> nn.Module:
    """The fine head (FocusNetCore.finesos.FineHead) of a bundle's
    ``fine_heads`` entry under ``config``, holding its weights, in eval
    mode; an entry with ``members`` is their FineEnsemble (its
    ``state_dict`` keys ``members.<i>.``, its ``width`` and ``blocks`` the
    first member's); raises RuntimeError if they do not fit."""
    from .finesos import FineEnsemble, FineHead

    zoom = tuple(entry["zoom"])
    if "members" in entry:
        head = FineEnsemble([FineHead(config.channels(32), int(m["width"]), zoom, int(m["blocks"]))
                             for m in entry["members"]])
    else:
        head = FineHead(config.channels(32), int(entry["width"]), zoom, int(entry["blocks"]))
    head.load_state_dict(entry["state_dict"], strict=True)
    return head.eval()


def ensemble_entry(entries: Sequence[dict]) -> dict:
    """One fine head entry (state_dict and settings, as ``fine_heads``
    holds them) whose head averages the probabilities of ``entries``' heads,
    which must share their fine voxels and ROI."""
    if len(entries) < 2:
        raise ValueError(f"an ensemble needs two or more fine heads, got {len(entries)}")
    shared = {(tuple(e["zoom"]), tuple(e["roi"])) for e in entries}
    if len(shared) != 1:
        raise ValueError(f"fine heads on different fine voxels or ROIs cannot be averaged: "
                         f"{sorted(shared)} (zoom, roi)")
    members, state = [], {}
    for i, e in enumerate(entries):
        if "members" in e:
            raise ValueError("a fine head to average is an ensemble itself: give its heads one by one")
        members.append({"width": int(e["width"]), "blocks": int(e["blocks"])})
        state.update({f"members.{i}.{k}": v for k, v in e["state_dict"].items()})
    first = entries[0]
    return {"state_dict": state, "zoom": list(first["zoom"]), "roi": list(first["roi"]),
            "width": members[0]["width"], "blocks": members[0]["blocks"], "members": members}


def with_fine_heads(path, heads: Dict[str, dict], out, overwrite: bool = False, note: str = "",
                    replace: bool = False) -> Path:
    """A copy of the bundle at ``path`` whose organs in ``heads`` are drawn by
    their fine heads (FocusNetCore.finesos); each entry holds the head's
    ``state_dict``, ``threshold``, ``zoom``, ``roi``, ``width``, ``blocks``
    and ``chosen_on`` (how it was chosen). The fine heads ``path`` had for
    other organs stay, unless ``replace``. Written atomically."""
    base, base_meta = load_bundle(path)
    fine = {} if replace else dict(base_meta.get("fine_heads") or {})
    for organ, head in heads.items():
        if organ not in base.config.organs.names:
            raise BundleError(path, f"{organ!r} is not one of its organs")
        if not 0.0 < float(head["threshold"]) < 1.0:
            raise BundleError(path, f"fine head threshold for {organ} must lie in (0, 1), got {head['threshold']}")
        if tuple(head["roi"]) != tuple(fine_roi(fine, tuple(head["roi"]))):
            raise BundleError(path, f"fine head {organ}: ROI {tuple(head['roi'])} differs from the bundle's other "
                              f"fine heads' {fine_roi(fine)}")
        entry = {"state_dict": head["state_dict"], "threshold": float(head["threshold"]),
                 "from": {**({"note": note} if note else {}), "chosen_on": head.get("chosen_on")},
                 **fine_settings(head)}
        fine_head(base.config, entry)
        fine[organ] = entry
    return _resave(base, {**base_meta, "fine_heads": fine}, out, overwrite, _kept_provenance(base_meta),
                   base_meta.get("click_heads"))


def fine_roi(fine: Optional[dict], default=None):
    """The ROI (model voxels, z, y, x) a bundle's fine heads share."""
    for entry in (fine or {}).values():
        return tuple(int(v) for v in entry["roi"])
    return default
