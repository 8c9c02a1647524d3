"""``model.compile=true``: the network's forward is compiled (inductor, on CPU here), its outputs
and state-dict keys are the eager network's, and training steps run with it. Slow: compiling takes
tens of seconds on 2 CPU cores."""

from __future__ import annotations

import copy

import pytest
import torch

from diffexp.build.factory import build_datamodule, build_module
from diffexp.training.diffusion_module import compile_in_place

# digits without the FID monitor: its feature classifier is an artifact a fresh clone lacks
CASES = {"mlp": [], "unet_small": ["experiment=digits", "~callbacks.fid"]}


@pytest.mark.slow
@pytest.mark.parametrize("network", sorted(CASES))
def test_the_compiled_network_matches_the_eager_one_and_trains(compose, network, tmp_path):
    from diffexp.train import train

    cfg = compose(CASES[network])
    dm = build_datamodule(cfg.data)
    module = build_module(cfg, dm)
    eager = module.denoiser.network
    compiled = copy.deepcopy(eager)
    compile_in_place(compiled)
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    torch.manual_seed(0)
    x = torch.randn(16, *dm.shape)
    log_snr = torch.linspace(-8, 10, 16)
    for p in eager.parameters():  # not the zero-initialized output layer's 0 = 0
        torch.nn.init.normal_(p, std=0.05)
    compiled.load_state_dict(eager.state_dict())
    with torch.no_grad():
        # float32 kernels fused and reordered: relative error ~ 1e-6 of the output's scale
        torch.testing.assert_close(compiled(x, log_snr), eager(x, log_snr), rtol=1e-4, atol=1e-5)
    metrics = train(
        compose(
            [
                *CASES[network],
                "model.compile=true",
                "trainer.max_steps=3",
                "trainer.check_val_every_n_epoch=null",
                "+trainer.limit_val_batches=1",
                "logger=none",
                f"paths.output_dir={tmp_path / 'run'}",
            ]
        )
    )
    assert torch.isfinite(torch.tensor(metrics["val/elbo_nats"]))
