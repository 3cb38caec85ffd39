"""Built-in detectors, one module each; every class documents its paper, formula and direction."""
from oodbench import hookimpl


@hookimpl
def oodbench_register_detectors(register):
    from . import gmm, mahalanobis, mahalanobis_ensemble, maf, odin, pixelcnn, softmax, temperature, vae, waic

    register(softmax.MaxSoftmax)
    register(softmax.MaxLogit)
    register(temperature.TemperatureScaling)
    register(odin.Odin)
    register(odin.OdinNoOOD)
    register(mahalanobis.Mahalanobis)
    register(mahalanobis.MahalanobisPreprocessed)
    register(mahalanobis_ensemble.MahalanobisEnsemble)
    register(mahalanobis_ensemble.MahalanobisEnsembleNoOOD)
    register(gmm.ZhengHong)
    register(gmm.FeatureGMM)
    register(gmm.FeatureGMM, name="gmm-100", k=100)
    register(gmm.FeatureGMM, name="gmm-1000", k=1000)
    register(vae.FeatureVAE)
    register(maf.FeatureMAF)
    from . import pixel_vae  # after vae, whose network it extends

    register(pixel_vae.PixelVAE)
    register(pixelcnn.PixelCNNPP)
    register(waic.GenerativeEnsemble)

    # Logit-based and head-based post-hoc detectors (issue 21): energy, entropy, GEN, KL-matching,
    # ReAct, ASH, DICE, SCALE, GradNorm.
    from . import activation_shaping, gradient_scores, logit_scores

    register(softmax.MaxLogit, name="maxlogit")
    register(logit_scores.Energy)
    register(logit_scores.Entropy)
    register(logit_scores.GEN)
    register(logit_scores.KLMatching)
    register(activation_shaping.ReAct)
    register(activation_shaping.ASHP)
    register(activation_shaping.ASHB)
    register(activation_shaping.ASHS)
    register(activation_shaping.DICE)
    register(activation_shaping.Scale)
    register(gradient_scores.GradNorm)

    # Feature-based post-hoc detectors (issue 21): KNN, RMDS, ViM, SHE, NNGuide, fDBD, NCI.
    from . import feature_scores, knn

    register(knn.KNN)
    register(feature_scores.RMDS)
    register(feature_scores.ViM)
    register(feature_scores.SHE)
    register(knn.NNGuide)
    register(feature_scores.FDBD)
    register(feature_scores.NCI)
