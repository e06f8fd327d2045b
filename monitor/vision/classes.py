"""Class names: ORNL Peregrine v2023's, the model's default channels, the background class."""

from __future__ import annotations

# The class that is not a defect: the powder bed around and between the defects (Peregrine's
# id 0, "Powder").
NO_DEFECT = "no_defect"

# ORNL Peregrine v2023 class ids -> names in this project's style. Older releases number the
# classes differently: pass explicit names.
PEREGRINE_2023_NAMES: dict[int, str] = {
    0: NO_DEFECT,
    1: "printed",
    2: "recoater_hopping",
    3: "recoater_streaking",
    4: "incomplete_spreading",
    5: "swelling",
    6: "debris",
    7: "super_elevation",
    8: "spatter",
    9: "misprint",
    10: "over_melting",
    11: "under_melting",
}
# The default model's channels, in order, and their Peregrine v2023 ids.
DEFAULT_PEREGRINE_IDS = (0, 5, 8, 9, 10, 11)
DEFAULT_CLASS_NAMES: tuple[str, ...] = tuple(PEREGRINE_2023_NAMES[i]
                                             for i in DEFAULT_PEREGRINE_IDS)
