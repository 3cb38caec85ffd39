"""Built-in classifiers."""
from oodbench import hookimpl


@hookimpl
def oodbench_register_models(register):
    from . import cifar_resnet, small_cnn

    register(small_cnn.SmallCNN)
    register(cifar_resnet.CifarResNet)
