"""Built-in detectors, one module each; every class documents its paper, formula and direction."""
from oodbench import hookimpl


@hookimpl
def oodbench_register_detectors(register):
    from . import softmax

    register(softmax.MaxSoftmax)
    register(softmax.MaxLogit)
