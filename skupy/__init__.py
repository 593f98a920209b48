"""skupy: Selective Knowledge negation Unlearning (SKU) for language models, on a C core."""
try:
    # Loads libscipy_openblas.so into the process, which the C extension links against.
    import scipy_openblas32  # noqa: F401
except ImportError:  # a build against a system OpenBLAS needs no preload
    pass

__version__ = "0.1.0"
