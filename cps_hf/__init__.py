"""cps_hf: Cross Pseudo Supervision (CVPR 2021) on the Hugging Face stack."""

__version__ = "0.1.0"
