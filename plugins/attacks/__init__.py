"""Built-in L-inf attacks in [0, 1] pixel space."""
from oodbench import hookimpl


@hookimpl
def oodbench_register_attacks(register):
    from . import gradient_sign

    register(gradient_sign.FGSM)
    register(gradient_sign.BIM)
    register(gradient_sign.PGD)
