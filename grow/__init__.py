"""Growth: re-parameterizable blocks, growable CNN / Transformer families and the growth loop."""
if __name__ != "adagrow.grow":  # found as a top-level name from a checkout: see adagrow.checkout
    from adagrow.checkout import become_stand_in
    become_stand_in(globals())
else:
    from .budget import DeployBudget, deploy_cost, deploy_latency_ms
    from .checkpoint import build_from_arch, load_deploy, load_grown, save_grown
    from .cnn import FAMILIES, GrowingCNN
    from .grower import GrowResult, GrowthConfig, Grower, apply_growth, grow
    from .reparam import RepConv2d, reparameterize
    from .transformer import GrowingTransformer

    __all__ = ["RepConv2d", "reparameterize", "GrowingCNN", "GrowingTransformer", "FAMILIES", "GrowthConfig", "Grower",
               "apply_growth", "grow", "GrowResult", "save_grown", "load_grown", "load_deploy", "build_from_arch",
               "DeployBudget", "deploy_cost", "deploy_latency_ms"]
