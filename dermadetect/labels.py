"""The lesion classes DermaDetect knows by name: codes, readable names, and which are malignant."""

# HAM10000 / ISIC 2018 Task 3 diagnosis codes, in the dataset's own alphabetical order.
HAM10000_CLASSES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")

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

# akiec counts as malignant: it includes Bowen's disease (intraepithelial carcinoma).
MALIGNANT = frozenset({"akiec", "bcc", "mel", "actinic keratosis", "basal cell carcinoma",
                       "melanoma", "squamous cell carcinoma"})

MELANOMA_LABELS = ("mel", "melanoma")

DISCLAIMER = ("DermaDetect is a research tool. It assists; it never diagnoses. "
              "Only a clinician who examines the lesion can make a diagnosis.")


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
