"""DermaDetect: explainable skin-lesion classification on HAM10000. It assists; it never diagnoses."""

__version__ = "0.1.0"
