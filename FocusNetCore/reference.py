"""FocusNetv2's published results, shown beside ours by ``focusnet evaluate``.

Table 1 (Dice %, 22 OARs, 1,164 in-house scans), table 2 (95HD mm, the
paper's averaged form) and table 3 (Dice %, MICCAI 2015 / PDDCA).
"""
PAPER_DICE_OAR22 = {
    "Eye_L": 89.68, "Eye_R": 89.47, "Lens_L": 81.91, "Lens_R": 82.47, "OpticNrv_L": 71.33, "OpticNrv_R": 75.25,
    "OpticChiasm": 61.22, "Pituitary": 72.19, "Brainstem": 89.09, "Lobe_Temporal_L": 87.73,
    "Lobe_Temporal_R": 88.30, "SpinalCord": 83.09, "Parotid_L": 84.58, "Parotid_R": 87.01,
    "Ear_Internal_L": 86.42, "Ear_Internal_R": 85.51, "Ear_Middle_L": 85.73, "Ear_Middle_R": 84.32,
    "Joint_TM_L": 76.36, "Joint_TM_R": 78.91, "Bone_Mandible_L": 92.44, "Bone_Mandible_R": 92.54,
}
PAPER_HD95_OAR22 = {
    "Eye_L": 1.51, "Eye_R": 1.56, "Lens_L": 1.41, "Lens_R": 1.59, "OpticNrv_L": 2.52, "OpticNrv_R": 2.55,
    "OpticChiasm": 3.58, "Pituitary": 2.16, "Brainstem": 1.93, "Lobe_Temporal_L": 3.99, "Lobe_Temporal_R": 3.85,
    "SpinalCord": 1.70, "Parotid_L": 3.30, "Parotid_R": 2.63, "Ear_Internal_L": 1.99, "Ear_Internal_R": 2.09,
    "Ear_Middle_L": 2.59, "Ear_Middle_R": 3.37, "Joint_TM_L": 3.15, "Joint_TM_R": 2.66,
    "Bone_Mandible_L": 1.31, "Bone_Mandible_R": 1.26,
}
PAPER_DICE_PDDCA9 = {
    "Brainstem": 88.2, "Bone_Mandible": 94.7, "OpticChiasm": 71.3, "OpticNrv_L": 79.0, "OpticNrv_R": 81.7,
    "Parotid_L": 89.8, "Parotid_R": 88.1, "Glnd_Submand_L": 84.0, "Glnd_Submand_R": 83.8,
}
PAPER_DICE = {"oar22": PAPER_DICE_OAR22, "pddca9": PAPER_DICE_PDDCA9}
PAPER_HD95 = {"oar22": PAPER_HD95_OAR22}
