"""edm-opt: read every diffusion loss against the optimal loss J*_sigma that the data allows.

Xu, Luo, Wang, He, Liu, "Diagnosing and Improving Diffusion Models by Estimating the Optimal Loss
Value" (arXiv 2506.13763), applied to EDM/EDM2 training. See docs/method.md of the design notes.
"""

__version__ = "0.1.0"


class EdmOptError(Exception):
    """Bad input that a user can fix: the CLI prints the message (naming the file or key) and exits 1."""
