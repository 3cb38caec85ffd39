"""Built-in classifiers."""
from oodbench import hookimpl


@hookimpl
def oodbench_register_models(register):
    from . import cifar_resnet, densenet, mlp, small_cnn, wide_resnet

    register(small_cnn.SmallCNN)
    register(cifar_resnet.CifarResNet)
    register(densenet.DenseNetBC)
    register(wide_resnet.WideResNet)
    register(wide_resnet.TemporalEnsemblingWideResNet)
    register(mlp.MLP)
