"""Built-in classifiers."""
from oodbench import hookimpl


@hookimpl
def oodbench_register_models(register):
    from . import small_cnn

    register(small_cnn.SmallCNN)
