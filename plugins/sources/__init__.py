"""Built-in failure sources: a classifier's mistakes, out-of-distribution sets, adversarial attacks, covariate shift."""
from oodbench import hookimpl


@hookimpl
def oodbench_register_sources(register):
    from . import covariate_shift, standard

    register(standard.Mistakes)
    register(standard.OutOfDistribution)
    register(standard.Adversarial)
    register(covariate_shift.CovariateShift)
