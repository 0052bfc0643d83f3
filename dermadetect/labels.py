"""The lesion classes DermaDetect knows by name: codes, readable names, and which are malignant."""

import re

# HAM10000 / ISIC 2018 Task 3 diagnosis codes, in the dataset's own alphabetical order.
HAM10000_CLASSES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")

# Every spelling of the seven diagnoses in public HAM10000 copies, after `_spelling_key` (case, "_", "-" and
# spaces do not matter): the codes, marmal88/skin_cancer's words (e.g. "benign_keratosis-like_lesions",
# "melanocytic_Nevi") and the full names of the HAM10000 paper and the ISIC challenges.
HAM10000_SPELLINGS = {
    "akiec": ("akiec", "actinic keratoses", "actinic keratosis", "actinic keratoses and intraepithelial carcinoma",
              "actinic keratoses and intraepithelial carcinoma / bowen's disease"),
    "bcc": ("bcc", "basal cell carcinoma"),
    "bkl": ("bkl", "benign keratosis like lesions", "benign keratosis like lesion", "benign keratosis"),
    "df": ("df", "dermatofibroma"),
    "mel": ("mel", "melanoma"),
    "nv": ("nv", "melanocytic nevi", "melanocytic nevus", "nevus"),
    "vasc": ("vasc", "vascular lesions", "vascular lesion"),
}

READABLE_NAMES = {
    "akiec": "Actinic keratosis / intraepithelial carcinoma",
    "bcc": "Basal cell carcinoma",
    "bkl": "Benign keratosis-like lesion",
    "df": "Dermatofibroma",
    "mel": "Melanoma",
    "nv": "Melanocytic nevus",
    "vasc": "Vascular lesion",
    # the ISIC 9-class folder layout names its classes in words
    "actinic keratosis": "Actinic keratosis",
    "basal cell carcinoma": "Basal cell carcinoma",
    "dermatofibroma": "Dermatofibroma",
    "melanoma": "Melanoma",
    "nevus": "Melanocytic nevus",
    "pigmented benign keratosis": "Pigmented benign keratosis",
    "seborrheic keratosis": "Seborrheic keratosis",
    "squamous cell carcinoma": "Squamous cell carcinoma",
    "vascular lesion": "Vascular lesion",
}

# What each HAM10000 class is, in a visitor's words (the demo's glossary).
CLASS_NOTES = {
    "akiec": "rough, scaly sun damage (actinic keratosis) or an early skin cancer confined to the top layer "
             "(Bowen's disease); can progress to squamous cell carcinoma",
    "bcc": "the most common skin cancer; grows slowly and rarely spreads, but needs treatment",
    "bkl": "harmless growths such as seborrheic keratoses, solar lentigines and lichen-planus-like keratoses",
    "df": "a harmless firm bump in the skin, often on the legs",
    "mel": "the most dangerous skin cancer; caught early it is usually curable",
    "nv": "an ordinary mole; by far the most common class",
    "vasc": "harmless growths of blood vessels, such as cherry angiomas",
}

# akiec counts as malignant: it includes Bowen's disease (intraepithelial carcinoma).
MALIGNANT = frozenset({"akiec", "bcc", "mel", "actinic keratosis", "basal cell carcinoma",
                       "melanoma", "squamous cell carcinoma"})

MELANOMA_LABELS = ("mel", "melanoma")

DISCLAIMER = ("DermaDetect is a research tool. It assists; it never diagnoses. "
              "Only a clinician who examines the lesion can make a diagnosis.")


def _spelling_key(label: str) -> str:
    return re.sub(r"[\s_-]+", " ", label.strip().lower())


_CODE_OF = {_spelling_key(spelling): code for code, spellings in HAM10000_SPELLINGS.items() for spelling in spellings}


def ham10000_code(label: str) -> str | None:
    """The HAM10000 code of any known spelling of a diagnosis ('melanocytic_Nevi' -> 'nv'), else None."""
    return _CODE_OF.get(_spelling_key(label))


def accepted_spellings() -> str:
    """The spellings ham10000_code accepts, one group per code, for error messages."""
    return "; ".join(", ".join(spellings) for spellings in HAM10000_SPELLINGS.values())


def readable_name(label: str) -> str:
    """'mel' -> 'Melanoma (mel)'; unknown labels are shown as they are."""
    name = READABLE_NAMES.get(label.lower())
    if name is None or name.lower() == label.lower():
        return name or label
    return f"{name} ({label})"


def melanoma_index(label_names) -> int | None:
    """Position of the melanoma class in label_names, or None when the label set has none."""
    for i, name in enumerate(label_names):
        if name.lower() in MELANOMA_LABELS:
            return i
    return None
