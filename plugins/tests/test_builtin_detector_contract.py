"""Every built-in detector passes the plugin test kit (``oodbench.testing.check_detector``); the kit itself, and
what it catches, is tested with the core (``tests/test_testing_kit.py``)."""
from oodbench.testing import check_detector

FAST_OPTIONS = {  # the kit's problem is tiny; shorten the slow trainers
    "pixelcnn": {"epochs": 4}, "vae": {"epochs": 300},
    "waic": {"M": 2}, "gmm-1000": {}, "odin": {"temperatures": (1, 10, 1000), "epsilons": (0.0, 0.002)},
    "odin-nood": {"temperatures": (1, 1000), "epsilons": (0.0, 0.002)},
    "mahalanobis-pre": {"epsilons": (0.0, 0.002)},
    "mahalanobis-ensemble": {"epsilons": (0.0, 0.002)}, "mahalanobis-ensemble-nood": {"epsilons": (0.0, 0.002)},
    # The kit's toy negatives have flatter activations than its positives, which ASH-S's and SCALE's
    # exp(s1 / s2) rewards at their papers' percentiles (pytorch-ood scores them the same: see
    # test_detector_posthoc_logits); at the 50th percentile the toy problem ranks as the kit expects.
    "ash-s": {"percentile": 50.0}, "scale": {"percentile": 50.0},
    # 800 steps of a small VAE: enough to learn which pixels light up together (test_detector_pixel_vae.py)
    "pixel-vae": {"steps": 800, "hidden": 16, "latent": 2},
}


def test_every_builtin_detector_honours_the_contract(registry):
    failures = {}
    for name in registry.names("detectors"):
        entry = registry.get("detectors", name)
        problems = check_detector(entry.target, {**entry.defaults, **FAST_OPTIONS.get(name, {})})
        if problems:
            failures[name] = problems
    assert not failures, failures
