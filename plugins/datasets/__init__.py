"""Built-in datasets: the offline digits benchmark, synthetic noise, transforms, users' own files."""
from oodbench import hookimpl


@hookimpl
def oodbench_register_datasets(register):
    from . import corruptions, digits, files, folders, noise, torchvision_sets, transforms

    register(digits.Digits)
    register(noise.GaussianNoise)
    register(noise.UniformNoise)
    register(transforms.Flip, name="hflip", axis="horizontal")
    register(transforms.Flip, name="vflip", axis="vertical")
    register(corruptions.CommonCorruption)
    register(digits.NaturalPatches)
    register(files.NpzImages)
    register(torchvision_sets.CIFAR10)
    register(torchvision_sets.CIFAR100)
    register(torchvision_sets.SVHN)
    register(torchvision_sets.MNIST)
    register(torchvision_sets.FashionMNIST)
    register(folders.FolderImages)
    register(folders.TinyImageNetCrop)
    register(folders.TinyImageNetResize)
    register(folders.LsunCrop)
    register(folders.LsunResize)
    register(folders.ISun)
    register(folders.Omniglot)
    register(folders.NotMNIST)
