"""Parameter count of PixelCNNNet in the "paper" config against the authors' PixelCNN++.

What is checked: our network built with ``CONFIGS["paper"]`` for 3-channel images has exactly
the parameters of the authors' CIFAR-10 model (openai/pixel-cnn, Salimans et al. 2017, the
defaults of their train.py: nr_resnet=5, nr_filters=160, nr_logistic_mix=10, unconditional,
no energy distance) minus the weight-normalisation gains, layer for layer.

Where the expected number comes from: ``authors_layers`` below re-derives, without using any of
our code, the layers that ``model_spec`` in pixel_cnn_pp/model.py builds (read at
openai/pixel-cnn commit bbc15688dd37934a12c2759cf2b34975e15901d9), with the shapes of the
variables that pixel_cnn_pp/nn.py gives them:

* conv2d:   V [kh, kw, c_in, c_out], g [c_out], b [c_out]
* deconv2d: V [kh, kw, c_out, c_in], g [c_out], b [c_out]
* dense (``nin``, a 1x1 convolution): V [c_in, c_out], g [c_out], b [c_out]

Weight normalisation uses W = g * V / ||V||, so V holds as many numbers as a plain weight and
b is a plain bias; only g (one gain per output channel per layer) has no counterpart in our
plain convolutions -- the documented deviation of the PixelCNNPP docstring. Everything else
matches: the extra input channel of ones (both codes concatenate it, so both first layers take
C + 1 = 4 input channels), the filter sizes, the nin skip connections (2F inputs from
concat_elu of one stream, 4F from concat_elu of the concatenated u and ul), the stride-2
shifted convolutions and transposed convolutions, and the final nin to 10 * nr_logistic_mix
outputs. The test compares the multiset of layers (kind, kernel, in, out) with ours, so a
difference elsewhere would show up as a named layer, not only as a different total.
"""
from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from torch import nn

from oodbench_plugins.detectors.pixelcnn import CONFIGS, PixelCNNNet

# (kind, kh, kw, c_in, c_out); kind is "conv" (nin counts as a 1x1 conv) or "deconv"
Layer = tuple[str, int, int, int, int]


def authors_layers(nr_resnet: int, nr_filters: int, nr_logistic_mix: int, image_channels: int = 3) -> list[Layer]:
    """The weight-normed layers of the authors' model_spec, in the order it creates them."""
    f = nr_filters
    layers: list[Layer] = []

    def down_shifted_conv(c_in, c_out, size=(2, 3)):  # nn.down_shifted_conv2d's default filter
        layers.append(("conv", *size, c_in, c_out))

    def down_right_shifted_conv(c_in, c_out, size=(2, 2)):  # nn.down_right_shifted_conv2d's default
        layers.append(("conv", *size, c_in, c_out))

    def nin(c_in, c_out):
        layers.append(("conv", 1, 1, c_in, c_out))

    def gated_resnet(conv, aux_channels=0):
        # c1 = conv(concat_elu(x), F) [+ nin(concat_elu(a), F)]; c2 = conv(concat_elu(c1), 2F);
        # concat_elu doubles the channels it is given
        conv(2 * f, f)
        if aux_channels:
            nin(2 * aux_channels, f)
        conv(2 * f, 2 * f)

    # x_pad: the image plus the channel of ones the authors concatenate
    c_pad = image_channels + 1
    down_shifted_conv(c_pad, f, (2, 3))  # u stream
    down_shifted_conv(c_pad, f, (1, 3))  # ul stream, the row above ...
    down_right_shifted_conv(c_pad, f, (2, 1))  # ... plus the pixels to the left

    # up pass: three resolutions of nr_resnet blocks, a stride-2 conv per stream between them;
    # the ul block takes the u stream's output (F channels) as its auxiliary input
    for scale in range(3):
        if scale:
            down_shifted_conv(f, f)
            down_right_shifted_conv(f, f)
        for _ in range(nr_resnet):
            gated_resnet(down_shifted_conv)
            gated_resnet(down_right_shifted_conv, aux_channels=f)

    # down pass: nr_resnet, then nr_resnet + 1 blocks per resolution, a stride-2 deconv per
    # stream between them (default filters [2, 3] and [2, 2], F -> F); u takes the popped u
    # (F channels), ul takes concat([u, popped ul]) (2F channels)
    for scale, blocks in enumerate([nr_resnet, nr_resnet + 1, nr_resnet + 1]):
        if scale:
            layers.append(("deconv", 2, 3, f, f))
            layers.append(("deconv", 2, 2, f, f))
        for _ in range(blocks):
            gated_resnet(down_shifted_conv, aux_channels=f)
            gated_resnet(down_right_shifted_conv, aux_channels=2 * f)

    # x_out = nin(elu(ul), 10 * nr_logistic_mix): the authors hard-code 10 numbers per mixture
    # component for RGB (logit, 3 means, 3 log-scales, 3 coefficients)
    nin(f, 10 * nr_logistic_mix)
    return layers


def authors_count(layers: list[Layer]) -> dict[str, int]:
    """Numbers held by the authors' variables V, g and b over all layers."""
    return {
        "V": sum(kh * kw * c_in * c_out for _, kh, kw, c_in, c_out in layers),
        "g": sum(c_out for *_, c_out in layers),
        "b": sum(c_out for *_, c_out in layers),
    }


def our_layers(net: nn.Module) -> list[Layer]:
    layers = []
    for module in net.modules():
        if isinstance(module, nn.ConvTranspose2d):
            c_in, c_out, kh, kw = module.weight.shape
            layers.append(("deconv", kh, kw, c_in, c_out))
        elif isinstance(module, nn.Conv2d):
            c_out, c_in, kh, kw = module.weight.shape
            layers.append(("conv", kh, kw, c_in, c_out))
    return layers


@pytest.fixture(scope="module")
def paper_net() -> PixelCNNNet:
    cfg = CONFIGS["paper"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # init of 53M numbers; no need to compete for shared cores
    try:
        return PixelCNNNet(3, cfg["nr_resnet"], cfg["nr_filters"], cfg["nr_logistic_mix"], cfg["dropout"])
    finally:
        torch.set_num_threads(threads)


def test_paper_config_is_the_authors_train_py_defaults():
    cfg = CONFIGS["paper"]
    assert (cfg["nr_resnet"], cfg["nr_filters"], cfg["nr_logistic_mix"]) == (5, 160, 10)


def test_authors_total_matches_closed_form():
    # Hand count with F = nr_filters = 160, R = nr_resnet = 5 (each weight-normed layer:
    # kh*kw*c_in*c_out numbers in V, c_out in g, c_out in b):
    #   first layers (4 -> F): V (6 + 3 + 2) * 4F = 44F, g + b = 3 * 2F              =            50F
    #   up u block   (2x3):    V 12F^2 + 24F^2,               g + b 2(F + 2F)         = 36F^2 +  6F
    #   up ul block  (2x2):    V 8F^2 + 2F^2 (nin 2F->F) + 16F^2, g + b 2(F + F + 2F) = 26F^2 +  8F
    #   down u block (2x3):    up u block + nin 2F->F                                 = 38F^2 +  8F
    #   down ul block (2x2):   V 8F^2 + 4F^2 (nin 4F->F) + 16F^2, g + b 8F           = 28F^2 +  8F
    #   3R = 15 up steps (u + ul):                      15 * (62F^2 + 14F)          = 930F^2 + 210F
    #   R + 2(R + 1) = 17 down steps:                   17 * (66F^2 + 16F)          = 1122F^2 + 272F
    #   2 stride-2 convs + 2 deconvs per stream: 2 * 2 * ((6 + 4)F^2 + 4F)           = 40F^2 +  16F
    #   output nin F -> 100: 100F + 2 * 100                                          = 100F + 200
    # total 2092F^2 + 648F + 200 = 53,555,200 + 103,680 + 200 = 53,659,080 (~53.7M: the
    # "53M-parameter" CIFAR-10 PixelCNN++); of which g = 3F + 15*7F + 17*8F + 8F + 100
    # = 252F + 100 = 40,420.
    counts = authors_count(authors_layers(5, 160, 10))
    assert sum(counts.values()) == 2092 * 160**2 + 648 * 160 + 200 == 53_659_080
    assert counts["g"] == 252 * 160 + 100 == 40_420
    # 189 weight-normed layers: 3 first, 15 * 5 up, 17 * 6 down, 8 resampling, 1 output
    assert len(authors_layers(5, 160, 10)) == 3 + 15 * 5 + 17 * 6 + 8 + 1 == 189


def test_paper_net_has_the_authors_layers(paper_net):
    # term by term: same (kind, kernel, in, out) multiset, so the same V and b shapes
    ours, theirs = Counter(our_layers(paper_net)), Counter(authors_layers(5, 160, 10))
    assert ours - theirs == Counter() and theirs - ours == Counter(), (ours - theirs, theirs - ours)
    # every conv of ours has a bias (the authors' b) and nothing else holds parameters
    conv_types = (nn.Conv2d, nn.ConvTranspose2d)
    assert all(m.bias is not None for m in paper_net.modules() if isinstance(m, conv_types))
    assert all(isinstance(m, conv_types) for m in paper_net.modules() if list(m.parameters(recurse=False)))


def test_paper_net_count_is_authors_minus_weight_norm_gains(paper_net):
    ours = sum(p.numel() for p in paper_net.parameters())
    counts = authors_count(authors_layers(5, 160, 10))
    # our weights = their V, our biases = their b; their gains g are the whole difference
    weights = sum(m.weight.numel() for m in paper_net.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)))
    assert weights == counts["V"]
    assert ours - weights == counts["b"]
    assert ours == sum(counts.values()) - counts["g"] == 53_659_080 - 40_420 == 53_618_660
    # the docstring's "53.6M parameters on RGB"
    assert math.isclose(ours / 1e6, 53.6, abs_tol=0.05)


@pytest.mark.parametrize("nr_resnet,nr_filters,nr_mix", [(1, 4, 2), (2, 8, 3)])
def test_small_configs_follow_the_same_rule(nr_resnet, nr_filters, nr_mix):
    # the rule holds for any size, not just at the paper's numbers
    net = PixelCNNNet(3, nr_resnet, nr_filters, nr_mix, 0.0)
    counts = authors_count(authors_layers(nr_resnet, nr_filters, nr_mix))
    assert Counter(our_layers(net)) == Counter(authors_layers(nr_resnet, nr_filters, nr_mix))
    assert sum(p.numel() for p in net.parameters()) == counts["V"] + counts["b"]
