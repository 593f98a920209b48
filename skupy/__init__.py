"""skupy: Selective Knowledge negation Unlearning (SKU) for language models, on a C core.

Typical use::

    import skupy
    model = skupy.load("smollm2-135m-instruct")
    print(model.generate("What is the capital of France?"))

    config = skupy.SKUConfig.from_preset("smollm2-135m", data_dir="../shared/data")
    result = skupy.SKU(config).run("runs/smollm2")
"""
import os as _os

# OpenMP loops and OpenBLAS calls alternate on the same cores, so spinning OpenMP
# workers would steal those cores from OpenBLAS between regions. On a 2-core
# machine that made the forward pass 3x slower. libgomp reads this when it loads.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Likewise OpenBLAS workers spin for 2^28 cycles after each call by default; 2^4
# lets them sleep at once, leaving the cores to the OpenMP loop that follows.
# OpenBLAS reads it when scipy_openblas32 loads the library, below.
_os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

try:
    # Loads libscipy_openblas.so into the process, which the C extension links against.
    import scipy_openblas32  # noqa: F401
except ImportError:  # a build against a system OpenBLAS needs no preload
    pass

__version__ = "0.1.0"

from ._core import get_num_threads, set_num_threads  # noqa: E402
from .config import ModelConfig  # noqa: E402
from .model import Model  # noqa: E402
from .optim import AdamW, LinearSchedule, clip_grad_norm  # noqa: E402
from .task_vector import TaskVector  # noqa: E402


def load(name_or_path, *, tokenizer=None, recompute: bool = False) -> Model:
    """Load a model by name ("smollm2-135m-instruct"), .gguf file or HF folder, with its tokenizer.

    The returned Model carries the tokenizer as model.tokenizer.
    """
    from .checkpoint import load_checkpoint

    config, params, model_tokenizer = load_checkpoint(name_or_path, tokenizer=tokenizer)
    return Model(config, params, tokenizer=model_tokenizer, recompute=recompute)


def __getattr__(name):
    # SKU pulls in the data and tokenizer modules; import them on first use.
    if name == "SKU":
        from .sku import SKU

        return SKU
    if name == "SKUConfig":
        from .sku_config import SKUConfig

        return SKUConfig
    raise AttributeError(f"module 'skupy' has no attribute {name!r}")


__all__ = ["AdamW", "LinearSchedule", "Model", "ModelConfig", "SKU", "SKUConfig", "TaskVector",
           "clip_grad_norm", "get_num_threads", "load", "set_num_threads"]
