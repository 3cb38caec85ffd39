"""Built-in datasets: the offline digits benchmark, synthetic noise, transforms, users' own files."""
from oodbench import hookimpl


@hookimpl
def oodbench_register_datasets(register):
    from . import digits, files, noise, transforms

    register(digits.Digits)
    register(noise.GaussianNoise)
    register(noise.UniformNoise)
    register(transforms.Flip, name="hflip", axis="horizontal")
    register(transforms.Flip, name="vflip", axis="vertical")
    register(digits.NaturalPatches)
    register(files.NpzImages)
